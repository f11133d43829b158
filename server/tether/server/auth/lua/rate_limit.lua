-- A fixed-window counter shared by every instance.
--
-- KEYS[1]  the bucket (a counter)   KEYS[2]  the bucket's calls (a set; same hash tag)
-- ARGV[1]  limit   ARGV[2]  window (ms)   ARGV[4]  the call's id (random, one per hit)
-- ARGV[3]  'hit': count this event (call ARGV[4]) and check it
--          'refund': take back the allowed hit ARGV[4] (the attempt turned out not to count)
--
-- Returns 0 when allowed, else the milliseconds until the window resets.
--
-- A call sent again after its reply was lost (redis-py's retry) is recognised, not counted
-- twice: every allowed hit's id is kept in KEYS[2], which expires with the bucket. A refused hit
-- is not counted at all (the bucket never goes past its limit), so sending it again cannot count
-- it twice either, and a refund that follows frees exactly one place. KEYS[2] holds at most
-- ARGV[1] ids (each counted in the bucket, and not refunded).
if ARGV[3] == 'refund' then
  if redis.call('SREM', KEYS[2], ARGV[4]) == 1
      and tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
    redis.call('DECR', KEYS[1])
  end
  return 0
end
if redis.call('SISMEMBER', KEYS[2], ARGV[4]) == 1 then return 0 end  -- counted and allowed
local function window_left()
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl == -1 then
    -- A bucket left without a TTL (it cannot happen through this script) must not block forever.
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    ttl = tonumber(ARGV[2])
  elseif ttl < 1 then
    ttl = tonumber(ARGV[2])  -- no bucket (a limit of 0), or one expiring this millisecond
  end
  return ttl
end
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then
  return window_left()  -- refused, and not counted
end
if redis.call('INCR', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], window_left())  -- the ids live as long as the window they count in
return 0
