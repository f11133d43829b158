-- Read a batch of documents and index ranges as one atomic snapshot, with their versions.
--
-- KEYS[1]  tether:{tether-data}:version   the partition's version (every key here carries the
--          partition's hash tag: {tether-data} for the default one, {tether-data:<enc(P)>})
-- KEYS[2]  tether:{tether-data}:kv        index key -> version that last changed it
-- KEYS[3..] the document and index keys read; the ops name them by position
-- ARGV[1]  JSON list of ops:
--   ['doc', i]                                      one document
--   ['index', i, 'asc' | 'desc', limit, doc_prefix] the ids of an index key in creation order,
--                                                   at most limit of them (-1: all), each with
--                                                   its document (key doc_prefix .. id)
-- ARGV[2]  optional: i of a mutation's outcome key (its first read of its first attempt). When
--          that key holds an outcome, the mutation already finished: nothing is read and the
--          reply is {-1, stored_outcome} (the caller replays it instead of running on).
--          '' for none (when ARGV[3] follows).
-- ARGV[3]  optional: JSON list of the i of a batch's outcome keys (Store._run_batch, the members
--          of a hot key's group commit). The read goes ahead, and the reply ends with one more
--          element: the list of what those keys hold, '' for none, in the same order.
--
-- Returns {version, r1, r2, ...}, one r per op:
--   doc   -> {v, d, c}: the version that last wrote it ('0' if never), the JSON ('' if absent
--            or deleted), its creation score ('0' if absent)
--   index -> {kv_version, {id, v, d, score, id, v, d, score, ...}}
--
-- The documents of an index range are read by name, not through KEYS: their ids are known only
-- here. They carry the same hash tag as KEYS, so in Redis Cluster they are in the same slot.
if ARGV[2] and ARGV[2] ~= '' then
  local stored = redis.call('GET', KEYS[tonumber(ARGV[2])])
  if stored then return {-1, stored} end
end

local ops = cjson.decode(ARGV[1])
local out = {tonumber(redis.call('GET', KEYS[1])) or 0}

for _, op in ipairs(ops) do
  local key = KEYS[op[2]]
  if op[1] == 'doc' then
    local f = redis.call('HMGET', key, 'v', 'd', 'c')
    out[#out + 1] = {f[1] or '0', f[2] or '', f[3] or '0'}
  else
    local kv = redis.call('HGET', KEYS[2], key) or '0'
    local limit = op[4]
    local range = {}
    if limit ~= 0 then
      local stop = limit - 1
      if limit < 0 then stop = -1 end
      if op[3] == 'desc' then
        range = redis.call('ZREVRANGE', key, 0, stop, 'WITHSCORES')
      else
        range = redis.call('ZRANGE', key, 0, stop, 'WITHSCORES')
      end
    end
    local rows = {}
    for j = 1, #range, 2 do
      local id = range[j]
      local f = redis.call('HMGET', op[5] .. id, 'v', 'd')
      if f[2] then
        rows[#rows + 1] = id
        rows[#rows + 1] = f[1]
        rows[#rows + 1] = f[2]
        rows[#rows + 1] = range[j + 1]
      end
    end
    out[#out + 1] = {kv, rows}
  end
end
if ARGV[3] then
  local outcomes = {}
  for j, i in ipairs(cjson.decode(ARGV[3])) do
    outcomes[j] = redis.call('GET', KEYS[i]) or ''
  end
  out[#out + 1] = outcomes
end
return out
