-- Start ending a session: from now on no data partition registers with it
-- (data/lua/partition_register.lua); return the partitions registered so far, which the caller
-- fences before the session ends. Idempotent. Both keys carry the session's hash tag: one slot.
--
-- KEYS[1]  tether:session:{SID}:partitions  set of the partitions registered
-- KEYS[2]  tether:session:{SID}:ending      the marker written here
-- ARGV[1]  the marker's lifetime (ms): the fence's
-- ARGV[2]  the marker's value (the end's reason)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
return redis.call('SMEMBERS', KEYS[1])
