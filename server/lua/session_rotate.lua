-- Rotate a refresh token: the five rules of protocol §2 in one atomic step.
--
-- KEYS[1]  the session hash (tether:session:{SID})
-- ARGV[1]  session id            ARGV[2]  now (ms)
-- ARGV[3]  hash of the presented secret
-- ARGV[4]  hash of the secret derived from it (what the next token will carry)
-- ARGV[5]  hash of the request's retryKey, or ''
-- ARGV[6]  reuse window (ms)     ARGV[7]  tombstone lifetime (ms)
-- ARGV[8]  grace (ms) kept after the deadline before Redis drops the key
-- ARGV[9]  session-ended channel
--
-- Returns {'rotated', userId, deadline} | {'current', userId, deadline} | {'reused'} |
-- {'invalid'}. A retry of the same call (redis-py after a lost reply) finds the presented token
-- as the previous one, rotated at the same `now`, and answers 'current' with the same pair.
local key = KEYS[1]
local sid, now = ARGV[1], tonumber(ARGV[2])
local presented, successor, retry = ARGV[3], ARGV[4], ARGV[5]
local window, tombstone_ttl, grace = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local f = redis.call('HMGET', key, 'state', 'uid', 'abs', 'last', 'inactive',
                     'cur', 'prev', 'rotated', 'retry', 'by', 'reason')
local state, uid = f[1], f[2]
if not state then return {'invalid'} end

local function end_session(reason)
  redis.call('DEL', key)
  redis.call('HSET', key, 'state', 'ended', 'uid', uid, 'reason', reason, 'by', presented)
  redis.call('PEXPIRE', key, tombstone_ttl)
  redis.call('PUBLISH', ARGV[9], cjson.encode({
    type = 'session_ended', sessionId = sid, userId = uid, reason = reason, at = now}))
end

if state ~= 'active' then
  -- Asked again with the token that revoked it: the same answer as the first time.
  if f[11] == 'refresh_reused' and f[10] == presented then return {'reused'} end
  return {'invalid'}
end

local deadline = math.min(tonumber(f[3]), tonumber(f[4]) + tonumber(f[5]))
if now >= deadline then
  end_session('session_expired')
  return {'invalid'}
end

if presented == f[6] then
  local new_deadline = math.min(tonumber(f[3]), now + tonumber(f[5]))
  redis.call('HSET', key, 'prev', f[6], 'cur', successor, 'rotated', now,
             'retry', retry, 'last', now)
  redis.call('PEXPIREAT', key, new_deadline + grace)
  return {'rotated', uid, new_deadline}
end

if f[7] ~= '' and presented == f[7] and successor == f[6] then
  local within_window = now - tonumber(f[8]) <= window
  local same_retry = retry ~= '' and retry == f[9]
  if within_window or same_retry then return {'current', uid, deadline} end
end

-- Any other token that carries a valid MAC for this session is an ancestor: reuse.
end_session('refresh_reused')
return {'reused'}
