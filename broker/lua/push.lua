-- Push jobs (one HTTP request, or many coalesced ones, or a batch) atomically.
-- ARGV[1] wake channel (published when the ready set goes from empty to non-empty, or when a
--         delayed job becomes the earliest one: the payload is then its run_at)
-- ARGV[2] 1 to count each job as a failure too (presque's PUT "re-queue after failure")
-- ARGV[3] 1 when this call is part of a batch push that must be all-or-nothing on uniq conflicts
-- ARGV[4..] 7 fields per job: id, body, priority, delay seconds, ttl seconds (0 = none),
--           uniq key ('' = none), max_attempts
-- Returns one entry per job: its id, or '!' .. id of the existing job holding its uniq key.
-- The broker mints ids before the first try, so an id that is already known means this call is
-- the retry of one that ran but whose reply was lost (connection dropped): that job is not
-- pushed twice. (A job of the first try already fetched destructively by then is not known any
-- more and would be pushed again; the retry follows the lost reply at once, so this is rare.)
local job_ids = {}
for i = 4, #ARGV, 7 do job_ids[#job_ids + 1] = ARGV[i] end
local known = redis.call('HMGET', K_META, unpack(job_ids))
local now = now_seconds()
local all_or_nothing = ARGV[3] == '1'
local out = {}
local accepted = {}
local taken = {}
local conflict = false
for i = 4, #ARGV, 7 do
  local uniq = ARGV[i + 5]
  local existing = false
  if uniq ~= '' then existing = taken[uniq] or redis.call('HGET', K_UNIQ, uniq) end
  if known[(i - 4) / 7 + 1] then
    out[#out + 1] = ARGV[i] -- pushed by the first try of this call
  elseif existing then
    out[#out + 1] = '!' .. existing
    conflict = true
  else
    if uniq ~= '' then taken[uniq] = ARGV[i] end
    out[#out + 1] = ARGV[i]
    accepted[#accepted + 1] = i
  end
end
if #accepted == 0 or (conflict and all_or_nothing) then return out end

local was_empty = redis.call('EXISTS', K_READY) == 0
local seq = redis.call('HINCRBY', K_STATS, 'pushed', #accepted) - #accepted
if ARGV[2] == '1' then redis.call('HINCRBY', K_STATS, 'failed', #accepted) end

local bodies, metas, ready, delayed, expiry, uniqs = {}, {}, {}, {}, {}, {}
local earliest = nil
-- The meta array is written with one string.format (what cjson.encode would write, numbers as
-- '%.14g', for a fraction of its cost): {priority, seq, attempt 0, failures 0, max_attempts,
-- created_at, run_at, expire_at, uniq, token '', lease 0, last_error '', failed_at 0}.
local now_text = string.format('%.14g', now)
for _, i in ipairs(accepted) do
  local id, uniq = ARGV[i], ARGV[i + 5]
  local priority, delay, ttl = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  seq = seq + 1
  local run_at = now + delay
  local run_at_text = now_text
  if delay ~= 0 then run_at_text = string.format('%.14g', run_at) end
  local expire_text = '0'
  if ttl > 0 then
    local expire_at = run_at + ttl
    expire_text = string.format('%.14g', expire_at)
    expiry[#expiry + 1] = expire_at
    expiry[#expiry + 1] = id
  end
  local uniq_json = '""'
  if uniq ~= '' then uniq_json = cjson.encode(uniq) end
  bodies[#bodies + 1] = id
  bodies[#bodies + 1] = ARGV[i + 1]
  metas[#metas + 1] = id
  metas[#metas + 1] = string.format('[%.14g,%.14g,0,0,%.14g,%s,%s,%s,%s,"",0,"",0]', priority, seq,
    tonumber(ARGV[i + 6]), now_text, run_at_text, expire_text, uniq_json)
  if delay > 0 then
    delayed[#delayed + 1] = run_at
    delayed[#delayed + 1] = id
    if not earliest or run_at < earliest then earliest = run_at end
  else
    ready[#ready + 1] = (9 - priority) * SEQ_SPAN + seq
    ready[#ready + 1] = id
  end
  if uniq ~= '' then
    uniqs[#uniqs + 1] = uniq
    uniqs[#uniqs + 1] = id
  end
end

redis.call('HSET', K_BODY, unpack(bodies))
redis.call('HSET', K_META, unpack(metas))
if #ready > 0 then
  redis.call('ZADD', K_READY, unpack(ready))
  if was_empty then redis.call('PUBLISH', ARGV[1], '0') end
end
if #delayed > 0 then
  local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  redis.call('ZADD', K_DELAYED, unpack(delayed))
  if #head == 0 or earliest < tonumber(head[2]) then redis.call('PUBLISH', ARGV[1], num(earliest)) end
end
if #expiry > 0 then redis.call('ZADD', K_EXPIRY, unpack(expiry)) end
if #uniqs > 0 then redis.call('HSET', K_UNIQ, unpack(uniqs)) end
return out
