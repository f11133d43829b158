-- Commit one mutation (optimistic concurrency control): check that nothing it read has changed,
-- apply its writes, advance its partition's version, append the commit to the stream and store the
-- mutation's outcome, all in one atomic step.
--
-- KEYS[1]  tether:{tether-data}:version   the partition's version (every key here carries the
--          partition's hash tag: {tether-data} for the default one, {tether-data:<enc(P)>})
-- KEYS[2]  tether:{tether-data}:commits   the commit stream (entry id V-0; fields v, k, t, w)
-- KEYS[3]  tether:{tether-data}:kv        index key -> version that last changed it
-- KEYS[4]  the outcome key: the caller's (user, clientId, requestId), or a one-off attempt key
-- KEYS[5..] the caller's session fence (tether:{tether-data}:ended:SID) when it has a session,
--          then every document and index key named below; the payload names them by position
-- ARGV[1]  JSON payload:
--   attempt         random id of this commit attempt (the same when redis-py retries the call)
--   fence           i of the session fence, or 0 (an anonymous caller: no session to end)
--   reads           [[i, 'doc' | 'index', version_seen], ...]
--   docs            [[i, json | false, slot], ...]  false deletes, leaving a tombstone;
--                   slot >= 0 marks a new document, whose creation score is V*1000 + slot
--   index_ops       [['new', i, id, slot] | ['add', i, id, score] | ['rem', i, id], ...]
--   touched         [i, ...]  index keys whose membership changes: their kv version becomes V
--   written         JSON text, the list of keys written: the stream entry's field k
--   outcome         JSON object text '{"attempt":...,"name":...,...}', stored at KEYS[4] as
--                   '{"version":V,"attempt":...,...}' (the value JSON is never re-encoded here)
--   outcome_ttl_ms, tombstone_ttl_ms, maxlen
--   values          JSON text or null: the stream entry's field w, the documents written
--                   ([[key, json | null, slot], ...]; left out past TETHER_COMMIT_VALUES_BYTES,
--                   and for a batch: see Store._commit_request)
--   more            optional: the other members of a group commit (a hot key's batch, see
--                   Store._run_batch), after the one above: [[i, outcome, outcome_ttl_ms,
--                   fence, offset], ...], i its outcome key; its outcome is stored at version
--                   V + offset when the commit writes (at the current version when not)
--   versions        optional (a batch): the versions the commit takes, V .. V + versions - 1,
--                   one per member that succeeded; each gets a stream entry, the first
--                   listing every key the batch wrote and the others none
--
-- Returns {'ok', V} | {'conflict', key} | {'duplicate', stored_outcome} | {'ended'}; for a member
-- j of more, {'duplicate', stored_outcome, j} | {'ended', j}: nothing written, the caller runs the
-- batch again without that member.
--
-- A commit that writes nothing validates its reads and stores its outcome at the current version
-- without advancing it. A retried call (a lost reply) finds its own attempt in the outcome key
-- and answers {'ok', V} again without writing anything; any other call that finds an outcome
-- there is a replay of a mutation that already finished, and gets that outcome (the caller
-- compares the function name it holds). Then, and only then, the session fence: a session that
-- has ended (sign-out, revocation, reuse, expiry; the fence is written before the session ends)
-- commits nothing and stores no outcome, also when it would write nothing: {'ended'}. A replay
-- of what committed before the end still answers above.
local p = cjson.decode(ARGV[1])

local function int(n)
  -- Exact for integers below 2^53; tostring() would switch to an exponent past 1e14.
  return string.format('%.0f', n)
end

local stored = redis.call('GET', KEYS[4])
if stored then
  local version, attempt = string.match(stored, '^{"version":(%d+),"attempt":"([^"]*)"')
  if attempt ~= nil and attempt == p.attempt then return {'ok', tonumber(version)} end
  return {'duplicate', stored}
end

if p.fence ~= 0 and redis.call('EXISTS', KEYS[p.fence]) == 1 then return {'ended'} end

for j, member in ipairs(p.more or {}) do
  local other = redis.call('GET', KEYS[member[1]])
  if other then return {'duplicate', other, j} end
  if member[4] ~= 0 and redis.call('EXISTS', KEYS[member[4]]) == 1 then return {'ended', j} end
end

for _, read in ipairs(p.reads) do
  local key = KEYS[read[1]]
  local current
  if read[2] == 'doc' then
    current = redis.call('HGET', key, 'v')
  else
    current = redis.call('HGET', KEYS[3], key)
  end
  if (tonumber(current) or 0) ~= read[3] then return {'conflict', key} end
end

local step = 0  -- 1 once the commit writes: the members of a batch take versions of their own
local function store_outcome(version)
  if p.outcome ~= cjson.null then
    redis.call('SET', KEYS[4], '{"version":' .. int(version) .. ',' .. string.sub(p.outcome, 2),
               'PX', p.outcome_ttl_ms)
  end
  for _, member in ipairs(p.more or {}) do
    redis.call('SET', KEYS[member[1]], '{"version":' .. int(version + step * member[5]) .. ','
               .. string.sub(member[2], 2), 'PX', member[3])
  end
end

local current = tonumber(redis.call('GET', KEYS[1])) or 0
if #p.docs == 0 and #p.index_ops == 0 then
  store_outcome(current)
  return {'ok', current}
end

-- The stream entry is written first: when it fails, nothing else has been written yet. Its field
-- t is the commit's time on Redis's clock in microseconds since the epoch: nothing in Tether reads
-- it; it tells operators (XREVRANGE) and bench/fanout.py when a commit happened. Its field w,
-- when the caller sends it, is the new state of the documents written (their version is V): an
-- instance that follows the stream updates its read cache with it instead of reading them back.
local v = current + 1
local clock = redis.call('TIME')
local committed_at = clock[1] .. string.format('%06d', tonumber(clock[2]))
local function append(version)
  if type(p.values) == 'string' then
    return redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', p.maxlen, int(version) .. '-0',
                       'v', int(version), 'k', p.written, 't', committed_at, 'w', p.values)
  end
  return redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', p.maxlen, int(version) .. '-0',
                     'v', int(version), 'k', p.written, 't', committed_at)
end
local added = append(v)
if type(added) == 'table' and added.err then
  -- The stream already holds V (the version key was reset or restored on its own): continue
  -- after the stream's last id, so versions keep growing. Any other error aborts here.
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      v = math.max(v, tonumber(string.match(info[j + 1], '^(%d+)')) + 1)
    end
  end
  added = append(v)
  if type(added) == 'table' and added.err then return redis.error_reply(added.err) end
end
-- A batch's other versions: no reader ever sees a state between two of its members, so their
-- entries list no keys (the first lists them all: a reader that has read it has seen them).
local last = v + (p.versions or 1) - 1
for w = v + 1, last do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', p.maxlen, int(w) .. '-0',
             'v', int(w), 'k', '[]', 't', committed_at)
end
redis.call('SET', KEYS[1], int(last))

for _, doc in ipairs(p.docs) do
  local key = KEYS[doc[1]]
  if doc[2] then
    redis.call('HSET', key, 'v', int(v), 'd', doc[2])
    if doc[3] >= 0 then redis.call('HSET', key, 'c', int(v * 1000 + doc[3])) end
    redis.call('PERSIST', key)
  else
    -- A tombstone keeps the deletion's version: a reader that meets it knows the document
    -- changed after its snapshot, which a missing key could not tell.
    redis.call('DEL', key)
    redis.call('HSET', key, 'v', int(v))
    redis.call('PEXPIRE', key, p.tombstone_ttl_ms)
  end
end

for _, op in ipairs(p.index_ops) do
  local key = KEYS[op[2]]
  if op[1] == 'new' then
    redis.call('ZADD', key, int(v * 1000 + op[4]), op[3])
  elseif op[1] == 'add' then
    redis.call('ZADD', key, int(op[4]), op[3])
  else
    redis.call('ZREM', key, op[3])
  end
end

for _, i in ipairs(p.touched) do
  redis.call('HSET', KEYS[3], KEYS[i], int(v))
end

step = 1
store_outcome(v)
return {'ok', v}
