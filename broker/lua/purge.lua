-- Remove up to ARGV[1] waiting jobs (ready first, then delayed); leased and dead ones stay.
-- Called repeatedly until it returns 0, so that a huge queue never blocks Redis for long;
-- each call is atomic, so every job is either wholly there or wholly gone.
-- Returns the number removed.
local limit = tonumber(ARGV[1])
local ids = redis.call('ZRANGE', K_READY, 0, limit - 1)
local from = K_READY
if #ids == 0 then
  ids = redis.call('ZRANGE', K_DELAYED, 0, limit - 1)
  from = K_DELAYED
end
if #ids == 0 then return 0 end
local uniqs = uniqs_of(ids)
redis.call('ZREM', from, unpack(ids))
redis.call('ZREM', K_EXPIRY, unpack(ids))
drop_jobs(ids, uniqs)
-- A waiting job has no lease entry, unless an old broker's reaper left one behind (_lib.lua).
redis.call('HDEL', K_LEASE, unpack(ids))
return #ids
