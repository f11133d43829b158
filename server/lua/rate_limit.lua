-- A fixed-window counter shared by every instance.
--
-- KEYS[1]  the bucket   ARGV[1]  limit   ARGV[2]  window (ms)
-- ARGV[3]  'hit' to count this event and check it, 'peek' to check without counting
--
-- Returns 0 when allowed, else the milliseconds until the window resets.
local count
if ARGV[3] == 'hit' then
  count = redis.call('INCR', KEYS[1])
  if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
else
  count = tonumber(redis.call('GET', KEYS[1]) or '0')
end
if count <= tonumber(ARGV[1]) then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  -- A bucket left without a TTL (it cannot happen through this script) must not block forever.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return ttl
