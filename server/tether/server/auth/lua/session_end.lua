-- End one session (sign-out, sign-out-all, administrator, expiry sweep) and announce it.
--
-- KEYS[1]  the session hash       ARGV[1]  session id   ARGV[2]  reason
-- ARGV[3]  now (ms)               ARGV[4]  tombstone lifetime (ms)
-- ARGV[5]  session-ended channel
-- ARGV[6]  '1' to end it only if its deadline has passed (the expiry sweep), else '0'
-- ARGV[7]  the ending call's id (random; kept in the tombstone as 'by')
--
-- Returns {1} when this call ended it, {0, deadline} when it is alive and not yet due (sweep
-- only), {-1} when it had already ended or never existed. Ending twice announces once. A call
-- sent again after its reply was lost (redis-py's retry) finds its own id in the tombstone: it
-- is answered {1} again, without a second announcement.
local key = KEYS[1]
local sid, reason, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local f = redis.call('HMGET', key, 'state', 'uid', 'abs', 'last', 'inactive', 'by')
if f[1] ~= 'active' then
  if f[1] == 'ended' and (ARGV[7] or '') ~= '' and f[6] == ARGV[7] then return {1} end
  return {-1}
end
if ARGV[6] == '1' then
  local deadline = math.min(tonumber(f[3]), tonumber(f[4]) + tonumber(f[5]))
  if now < deadline then return {0, deadline} end
end
redis.call('DEL', key)
redis.call('HSET', key, 'state', 'ended', 'uid', f[2], 'reason', reason, 'by', ARGV[7] or '')
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
redis.call('PUBLISH', ARGV[5], cjson.encode({
  type = 'session_ended', sessionId = sid, userId = f[2], reason = reason, at = now}))
return {1}
