-- Rotate a refresh token: the five rules of protocol §2 in one atomic step.
--
-- KEYS[1]  the session hash (tether:session:{SID}); the session-ended event takes SID from it
-- ARGV[1]  now (ms)
-- ARGV[2]  hashes, 64 hex digits each, concatenated: the presented secret's, then the one
--          derived from it (what the next token will carry), then the request's retryKey's
--          (absent without a retryKey)
-- ARGV[3]  the constant settings, space-separated: reuse window (ms), tombstone lifetime (ms),
--          grace (ms) kept after the deadline before Redis drops the key, session-ended channel
-- (Three arguments rather than nine: redis-py spends 1-2 us of CPU packing each one.)
--
-- Returns one string, not an array (cheaper for the caller to read): 'rotated DEADLINE USERID' |
-- 'current DEADLINE USERID' | 'reused' | 'expired' (this call ended the session: its deadline had
-- passed) | 'invalid'. The caller fences the session after 'reused' and 'expired' (the fence is
-- in another Cluster slot: sessions.py's docstring). The user id comes last, so it may hold any
-- character. A retry of the same call (redis-py after a lost reply) finds the presented token as
-- the previous one, rotated at the same `now`, and answers 'current' with the same pair.
--
-- The common case, the current token rotating, is kept short: it reads only the fields it needs
-- and parses none of the settings unless the key's expiry moves.
local key = KEYS[1]
local now = tonumber(ARGV[1])
local hashes = ARGV[2]
local presented, successor = string.sub(hashes, 1, 64), string.sub(hashes, 65, 128)
local retry = string.sub(hashes, 129)

-- window, tombstone_ttl, grace, channel
local function settings()
  return string.match(ARGV[3], '^(%d+) (%d+) (%d+) (.+)$')
end

local f = redis.call('HMGET', key, 'state', 'uid', 'abs', 'last', 'inactive', 'cur')
local state, uid, current = f[1], f[2], f[6]
if not state then return 'invalid' end

-- 'OUTCOME DEADLINE USERID' as a status reply: one line, which the caller reads for less CPU
-- than a bulk string. Redis turns CR and LF in a status reply into spaces, so a user id holding
-- either (Tether makes none) goes in a bulk reply, unaltered.
local function grant(outcome, deadline)
  local reply = string.format('%s %d %s', outcome, deadline, uid)
  if string.find(uid, '[\r\n]') then return reply end
  return {ok = reply}
end

local function end_session(reason)
  local _, tombstone_ttl, _, channel = settings()
  redis.call('DEL', key)
  redis.call('HSET', key, 'state', 'ended', 'uid', uid, 'reason', reason, 'by', presented)
  redis.call('PEXPIRE', key, tombstone_ttl)
  redis.call('PUBLISH', channel, cjson.encode({
    type = 'session_ended', sessionId = string.match(key, '{(.*)}$'), userId = uid,
    reason = reason, at = now}))
end

if state ~= 'active' then
  -- Asked again with the token that revoked it: the same answer as the first time.
  local t = redis.call('HMGET', key, 'reason', 'by')
  if t[1] == 'refresh_reused' and t[2] == presented then return 'reused' end
  return 'invalid'
end

local absolute, inactive = tonumber(f[3]), tonumber(f[5])
local deadline = math.min(absolute, tonumber(f[4]) + inactive)
if now >= deadline then
  end_session('session_expired')
  return 'expired'
end

if presented == current then
  local new_deadline = math.min(absolute, now + inactive)
  redis.call('HSET', key, 'prev', presented, 'cur', successor, 'rotated', ARGV[1],
             'retry', retry, 'last', ARGV[1])
  -- The key expires at deadline + grace: set so by sign-in and by every rotation. When the
  -- absolute deadline binds (always with the default settings) it has not moved, and neither
  -- has the expiry: no PEXPIREAT (a second write makes Redis wrap the effects in MULTI/EXEC).
  if new_deadline ~= deadline then
    local _, _, grace = settings()
    redis.call('PEXPIREAT', key, new_deadline + tonumber(grace))
  end
  return grant('rotated', new_deadline)
end

local p = redis.call('HMGET', key, 'prev', 'rotated', 'retry')
local previous, rotated_at, previous_retry = p[1], p[2], p[3]
if previous ~= '' and presented == previous and successor == current then
  local window = settings()
  local within_window = now - tonumber(rotated_at) <= tonumber(window)
  local same_retry = retry ~= '' and retry == previous_retry
  if within_window or same_retry then return grant('current', deadline) end
end

-- Any other token that carries a valid MAC for this session is an ancestor: reuse.
end_session('refresh_reused')
return 'reused'
