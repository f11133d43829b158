-- A fixed-window counter shared by every instance.
--
-- KEYS[1]  the bucket   ARGV[1]  limit   ARGV[2]  window (ms)
-- ARGV[3]  'hit': count this event and check it
--          'refund': take back one earlier hit (the attempt turned out not to count)
--
-- Returns 0 when allowed, else the milliseconds until the window resets.
if ARGV[3] == 'refund' then
  if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
  return 0
end
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if count <= tonumber(ARGV[1]) then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  -- A bucket left without a TTL (it cannot happen through this script) must not block forever.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return ttl
