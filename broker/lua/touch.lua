-- Extend a lease to `lease` seconds from now (progress reports do this too).
-- ARGV[1] id   ARGV[2] token   ARGV[3] lease seconds, 0 = the lease the job was taken with
-- (a touch with an explicit lease does not change that default for the next touch)
-- Returns {status, deadline}: status 1 ok / 0 unknown / -1 stale
local now = now_seconds()
local id = ARGV[1]
local stored = redis.call('HGET', K_LEASE, id)
local status, entry = check_lease(id, stored, ARGV[2], now, false)
if status ~= 1 then return {status, ''} end
local token, _, attempt, taken_for, has_uniq = parse_lease(entry)
local lease = tonumber(ARGV[3])
if lease <= 0 then lease = taken_for end
local deadline = string.format('%.17g', now + lease)
redis.call('ZADD', K_LEASED, 'XX', deadline, id)
-- (A lease from before the lease hash keeps its token in its meta, and gets no entry.)
if stored then redis.call('HSET', K_LEASE, id, lease_entry(token, deadline, attempt, taken_for, has_uniq)) end
return {1, num(now + lease)}
