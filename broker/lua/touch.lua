-- Extend a lease to `lease` seconds from now (progress reports do this too).
-- ARGV[1] id   ARGV[2] token   ARGV[3] lease seconds, 0 = the lease the job was taken with
-- (a touch with an explicit lease does not change that default for the next touch)
-- Returns {status, deadline}: status 1 ok / 0 unknown / -1 stale
local now = now_seconds()
local id = ARGV[1]
local status, meta = check_lease(id, redis.call('HGET', K_META, id), redis.call('ZSCORE', K_LEASED, id), ARGV[2], now, false)
if status ~= 1 then return {status, ''} end
local lease = tonumber(ARGV[3])
if lease <= 0 then lease = meta[M_LEASE] end
redis.call('ZADD', K_LEASED, 'XX', now + lease, id)
return {1, num(now + lease)}
