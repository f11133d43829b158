-- Register a data partition with a session before the session's first commit into it, unless the
-- session is ending or has ended (protocol 1.1 §5 rule 6 across partitions; see
-- tether.server.auth.sessions). All three keys carry the session's hash tag: one slot.
--
-- KEYS[1]  tether:session:{SID}             the session hash (state = active | ended)
-- KEYS[2]  tether:session:{SID}:partitions  set of the partitions registered
-- KEYS[3]  tether:session:{SID}:ending      exists once the session has started ending
-- ARGV[1]  the partition's name
-- ARGV[2]  the least lifetime of the set (ms); it lives at least as long as the session hash
-- ARGV[3]  the most partitions a session registers (TETHER_MAX_SESSION_PARTITIONS)
--
-- Returns 1 (registered: every end from now on fences this partition), 0 (refused: ending or
-- ended) or -1 (refused: the session has registered the most partitions it may).
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0
    and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return -1
end
redis.call('SADD', KEYS[2], ARGV[1])
local ttl = math.max(tonumber(ARGV[2]), tonumber(redis.call('PTTL', KEYS[1])))
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
