-- Lift a session fence that the expiry sweep wrote, for a session that turned out alive (a
-- refresh on an instance whose clock lags ran between the sweep's read and its end script).
--
-- KEYS[1]  the fence (tether:{tether-data}:ended:SID)
-- ARGV[1]  the value the sweep wrote (reason and a random id, unique to that write)
--
-- Returns 1 when it deleted the fence, 0 when the fence is another writer's (a sign-out's, a
-- revocation's) or gone: that one stays.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
