-- Take up to `count` jobs from the queue: leased (lease > 0) or destructively (lease = 0).
-- Due delayed jobs are promoted first; ttl-expired jobs met on the way are dropped.
-- ARGV[1] count
-- ARGV[2] lease seconds, 0 for a destructive fetch (the job is gone once returned)
-- ARGV[3] token prefix (random per call; tokens are prefix .. index)
-- ARGV[4] max_inflight, 0 = unlimited (counts leased jobs across all processes)
-- ARGV[5] rate in jobs/second, 0 = unlimited (token bucket in the state hash, burst = max(rate, 1))
-- Returns {status, hint, id1, token1, attempt1, body1, latency1, id2, ...}
--   status 1: jobs follow (maybe none when all popped ones had expired: fetch again); hint = '+'
--     when ready jobs are left, else as for status 0 (so that the caller need not fetch again
--     only to hear that the queue is empty)
--   status 0: empty; hint = run_at of the next delayed job, or '' when none
--   status -1: paused; -2: rate limited, hint = seconds until a token; -3: max_inflight reached
local count = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local max_inflight = tonumber(ARGV[4])
local rate = tonumber(ARGV[5])
local now = now_seconds()

local state = redis.call('HMGET', K_STATE, 'paused', 'rate_tokens', 'rate_at')
if state[1] == '1' then return {-1, ''} end

local _, delayed_head = promote_due(now, count * 2 + 100)

if max_inflight > 0 and lease > 0 then
  local room = max_inflight - redis.call('ZCARD', K_LEASED)
  if room <= 0 then return {-3, ''} end
  if room < count then count = room end
end

local tokens = 0
if rate > 0 then
  local burst = math.max(rate, 1)
  tokens = tonumber(state[2] or burst)
  local last = tonumber(state[3] or now)
  tokens = math.min(burst, tokens + (now - last) * rate)
  if tokens < 1 then return {-2, num((1 - tokens) / rate)} end
  if math.floor(tokens) < count then count = math.floor(tokens) end
end

local popped = redis.call('ZPOPMIN', K_READY, count)
if #popped == 0 then return {0, next_run_at(delayed_head)} end

local ids = {}
for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
local metas = redis.call('HMGET', K_META, unpack(ids))
local bodies = redis.call('HMGET', K_BODY, unpack(ids))

local out = {1, ''}
local gone_ids, gone_uniq_ids, expired_ids, expired_uniq_ids, lease_args, entry_args, unexpire = {}, {}, {}, {}, {}, {}, {}
-- One string for the leased set and the lease entries, so that both hold the same deadline.
local deadline = string.format('%.17g', now + lease)
for i, id in ipairs(ids) do
  if metas[i] and bodies[i] then
    -- The meta is only read (its head): the lease goes to the lease hash, not into the meta.
    local attempt, run_at, expire_at, has_uniq = meta_head(metas[i])
    if expire_at > 0 and expire_at < now then
      expired_ids[#expired_ids + 1] = id
      if has_uniq then expired_uniq_ids[#expired_uniq_ids + 1] = id end
    else
      attempt = attempt + 1
      local token = ''
      if lease > 0 then
        token = ARGV[3] .. i
        lease_args[#lease_args + 1] = deadline
        lease_args[#lease_args + 1] = id
        entry_args[#entry_args + 1] = id
        entry_args[#entry_args + 1] = lease_entry(token, deadline, attempt, ARGV[2], has_uniq)
      else
        gone_ids[#gone_ids + 1] = id
        if has_uniq then gone_uniq_ids[#gone_uniq_ids + 1] = id end
      end
      if expire_at > 0 then unexpire[#unexpire + 1] = id end
      out[#out + 1] = id
      out[#out + 1] = token
      out[#out + 1] = attempt
      out[#out + 1] = bodies[i]
      out[#out + 1] = num(now - run_at)
    end
  end
  -- A ready id without meta or body cannot happen through these scripts; it is dropped.
end

if #lease_args > 0 then
  redis.call('ZADD', K_LEASED, unpack(lease_args))
  redis.call('HSET', K_LEASE, unpack(entry_args))
end
if #gone_ids > 0 then
  drop_jobs(gone_ids, uniqs_of(gone_uniq_ids))
  redis.call('HINCRBY', K_STATS, 'processed', #gone_ids)
end
if #expired_ids > 0 then
  drop_jobs(expired_ids, uniqs_of(expired_uniq_ids))
  redis.call('HINCRBY', K_STATS, 'expired', #expired_ids)
  for _, id in ipairs(expired_ids) do unexpire[#unexpire + 1] = id end
end
if #unexpire > 0 then redis.call('ZREM', K_EXPIRY, unpack(unexpire)) end
if rate > 0 then
  local delivered = (#out - 2) / 5
  redis.call('HSET', K_STATE, 'rate_tokens', num(tokens - delivered), 'rate_at', num(now))
end
-- Fewer jobs popped than asked for: the ready set is empty, no need to ask.
if #ids == count and redis.call('EXISTS', K_READY) == 1 then
  out[2] = '+'
else
  out[2] = next_run_at(delayed_head)
end
return out
