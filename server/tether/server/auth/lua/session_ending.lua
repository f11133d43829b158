-- Start ending a session: from now on no data partition registers with it
-- (data/lua/partition_register.lua); return the partitions registered so far, which the caller
-- fences before the session ends. Idempotent. Both keys carry the session's hash tag: one slot.
--
-- KEYS[1]  tether:session:{SID}:partitions  set of the partitions registered
-- KEYS[2]  tether:session:{SID}:ending      the marker written here
-- ARGV[1]  the marker's lifetime (ms): the fence's
-- ARGV[2]  the marker's value (the end's reason)
-- ARGV[3]  'nx' to leave an existing marker as it is (the expiry sweep, which may lift its own
--          marker later: never another end's), else ''
if ARGV[3] == 'nx' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1], 'NX')
else
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
end
return redis.call('SMEMBERS', KEYS[1])
