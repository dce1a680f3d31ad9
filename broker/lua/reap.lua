-- Housekeeping for one queue, run about once a second by one broker process (whichever holds
-- the reaper lock), so that a dead process's leases still come back:
-- expired leases count as failures (retry with backoff or dead-letter), due delayed jobs
-- become ready, ttl-expired waiting jobs are dropped, old ack tombstones are trimmed.
-- ARGV[1] wake channel   ARGV[2] limit per kind   ARGV[3] backoff base   ARGV[4] backoff cap
-- ARGV[5] random seed    ARGV[6] tombstone window seconds
-- Returns {lease_expired, dead_lettered, promoted, expired, more (1 when a limit was hit)}, then
-- per job whose lease lapsed: its id and where it went ('ready' | 'delayed' | 'dead' | 'expired'),
-- so that the broker can tell event watchers what a consumer's nack would have told them.
local now = now_seconds()
local limit = tonumber(ARGV[2])
math.randomseed(tonumber(ARGV[5]))
local wake = false
local more = 0

local counts = {failed = 0, dead_lettered = 0, expired = 0, retried = 0}

local outcomes = {}
local lapsed = redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', now, 'LIMIT', 0, limit)
if #lapsed > 0 then
  if #lapsed == limit then more = 1 end
  local metas = redis.call('HMGET', K_META, unpack(lapsed))
  local entries = redis.call('HMGET', K_LEASE, unpack(lapsed))
  redis.call('ZREM', K_LEASED, unpack(lapsed))
  redis.call('HDEL', K_LEASE, unpack(lapsed))
  for i, id in ipairs(lapsed) do
    if metas[i] then
      local meta = cjson.decode(metas[i])
      end_lease(meta, entries[i] or nil)
      local outcome = fail_job(id, meta, now, 'lease expired', -1, tonumber(ARGV[3]), tonumber(ARGV[4]), counts)
      if outcome == 'ready' then wake = true end
      outcomes[#outcomes + 1] = id
      outcomes[#outcomes + 1] = outcome
    end
  end
end

local promoted = promote_due(now, limit)
if promoted > 0 then wake = true end
if promoted == limit then more = 1 end

local stale = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', now, 'LIMIT', 0, limit)
local expired_ids, expired_metas = {}, {}
if #stale > 0 then
  if #stale == limit then more = 1 end
  local metas = redis.call('HMGET', K_META, unpack(stale))
  for i, id in ipairs(stale) do
    -- Only waiting jobs expire; a leased one was taken in time (fetch removes it from here).
    if metas[i] and not redis.call('ZSCORE', K_LEASED, id) then
      expired_ids[#expired_ids + 1] = id
      expired_metas[#expired_metas + 1] = cjson.decode(metas[i])
    end
  end
  redis.call('ZREM', K_EXPIRY, unpack(stale))
  if #expired_ids > 0 then
    redis.call('ZREM', K_READY, unpack(expired_ids))
    redis.call('ZREM', K_DELAYED, unpack(expired_ids))
    drop_jobs(expired_ids, uniqs_of_metas(expired_metas))
    counts.expired = counts.expired + #expired_ids
  end
end

redis.call('ZREMRANGEBYSCORE', K_DONE, '-inf', now - tonumber(ARGV[6]))
count_stats(counts)
if wake then redis.call('PUBLISH', ARGV[1], '0') end
local out = {#lapsed, counts.dead_lettered, promoted, #expired_ids, more}
for _, value in ipairs(outcomes) do out[#out + 1] = value end
return out
