-- Push jobs, then take up to `count` jobs for this broker's waiting subscribers, in one call
-- (QueueService.push_fetch): the reply and the queue's state afterwards are exactly those of
-- push_then_fetch.lua (push.lua's body, then fetch.lua's), which this script runs as
-- general_script for every case but one, the latency path's: the queue has nothing ready and no
-- delayed job due, so the fetch would take exactly the jobs just pushed, in push order. Those are
-- then handed off: written straight as leased (body, meta as push writes it, leased set, lease
-- entry as fetch writes it), never through the ready set, with no ready-set write, pop, or
-- re-read of what was just written (10 Redis commands instead of 15 for one job), and without the
-- shared library, which this script runs without (scripts.py, FRONTED).
-- The hand-off is taken only when its result is sure to be the general path's; otherwise (or when
-- in doubt) the general path runs, after this script's reads only. It needs:
--   no rate limit, no max_inflight (or a destructive fetch, which ignores it), a count >= 1;
--   1 to `count` jobs, none delayed, all of one priority (so that push order is pop order);
--   none known already (a resend: push.lua's rules), no uniq key taken or used twice;
--   the queue not paused, its ready set empty, no delayed job due;
--   no job whose ttl would have expired it on the way (fetch.lua reads its meta's rounded text).
-- The reply then is {ids, {1, next delayed run_at or '', id, token, 1, body, latency, ...}}: all
-- jobs taken, nothing ready left, so no wake-up is published (push_then_fetch.lua's rule), and
-- a ttl job is never added to the expiry set (fetch.lua would remove it as it delivers it).
-- ARGV as push_then_fetch.lua's: [1..5] count, lease seconds, token prefix, max_inflight, rate;
-- [6] wake channel, [7] count failure, [8] all or nothing, [9..] the jobs (push.lua's layouts).
local count, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
if not count or count < 1 or count % 1 ~= 0 or not lease or lease < 0 or tonumber(ARGV[5]) ~= 0
  or (lease > 0 and tonumber(ARGV[4]) ~= 0) then
  return general_script(ARGV, redis)
end

-- Job j: its id is ARGV[at[j]], its body the next one, its options start at ARGV[opt[j]]
-- (priority, delay, ttl, uniq, max_attempts), in either layout.
local nargs = #ARGV
local ids, at, opt, n = {}, {}, {}, 0
if ARGV[9] == '' then
  local i, o = 9, nil
  while i <= nargs do
    if ARGV[i] == '' then
      o = i + 1
      i = i + 6
    else
      n = n + 1
      ids[n], at[n], opt[n] = ARGV[i], i, o
      i = i + 2
    end
  end
else
  for i = 9, nargs, 7 do
    n = n + 1
    ids[n], at[n], opt[n] = ARGV[i], i, i + 2
  end
end
if n == 0 or n > count then return general_script(ARGV, redis) end
local priority = ARGV[opt[1]]
local uniqs, nu, last_opt = nil, 0, nil
for j = 1, n do
  local o = opt[j]
  if o ~= last_opt then
    last_opt = o
    if ARGV[o] ~= priority or tonumber(ARGV[o + 1]) ~= 0 then return general_script(ARGV, redis) end
  end
  local uniq = ARGV[o + 3]
  if uniq ~= '' then
    uniqs = uniqs or {}
    if uniqs[uniq] then return general_script(ARGV, redis) end
    uniqs[uniq] = true
    nu = nu + 1
  end
end

local K_READY, K_DELAYED, K_LEASED = KEYS[1], KEYS[2], KEYS[3]
local K_BODY, K_META, K_UNIQ, K_STATS, K_STATE, K_LEASE = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[12]
-- Reads only, up to the decision: the general path may still run after them (the likelier
-- reasons to fall back are looked at first).
if redis.call('EXISTS', K_READY) == 1 or redis.call('HGET', K_STATE, 'paused') == '1' then
  return general_script(ARGV, redis)
end
for _, known in ipairs(redis.call('HMGET', K_META, unpack(ids))) do
  if known then return general_script(ARGV, redis) end
end
if nu > 0 then
  local names = {}
  for name in pairs(uniqs) do names[#names + 1] = name end
  for _, holder in ipairs(redis.call('HMGET', K_UNIQ, unpack(names))) do
    if holder then return general_script(ARGV, redis) end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
if head[2] and tonumber(head[2]) <= now then return general_script(ARGV, redis) end

-- Texts as push.lua writes them (see there): numbers of the meta as '%.14g' writes them.
local now_text = string.format('%.14g', now)
local function g14(x)
  if x >= 1 and x < 1e14 and x % 1 == 0 then return string.format('%d', x) end
  return string.format('%.14g', x)
end
local expire_texts = {}
for j = 1, n do
  local ttl = tonumber(ARGV[opt[j] + 2])
  if ttl > 0 then
    local text = string.format('%.14g', now + ttl)
    -- fetch.lua would find it expired (its meta's expire_at is rounded): the general path's case.
    if tonumber(text) < now then return general_script(ARGV, redis) end
    expire_texts[j] = text
  else
    expire_texts[j] = '0'
  end
end

local seq = redis.call('HINCRBY', K_STATS, 'pushed', n) - n
if ARGV[7] == '1' then redis.call('HINCRBY', K_STATS, 'failed', n) end
-- fetch.lua's latency: now - run_at as read back from the meta (run_at is now, rounded).
local latency = string.format('%.6f', now - tonumber(now_text))
local out = {1, head[2] or ''}
if lease == 0 then
  -- Taken destructively: fetch.lua would drop each job (and free its uniq key) at once.
  for j = 1, n do
    local k = 5 * j - 2
    out[k], out[k + 1], out[k + 2], out[k + 3], out[k + 4] = ids[j], '', 1, ARGV[at[j] + 1], latency
  end
  redis.call('HINCRBY', K_STATS, 'processed', n)
  return {ids, out}
end

local head_text = '[' .. g14(tonumber(priority)) .. ','
local deadline = string.format('%.17g', now + lease)
local bodies, metas, leased, entries, held = {}, {}, {}, {}, {}
for j = 1, n do
  local id, o, body = ids[j], opt[j], ARGV[at[j] + 1]
  local uniq = ARGV[o + 3]
  seq = seq + 1
  local seq_text
  if seq < 1e14 then seq_text = string.format('%d', seq) else seq_text = string.format('%.14g', seq) end
  local uniq_json, has_uniq = '""', ' 0'
  if uniq ~= '' then
    uniq_json, has_uniq = cjson.encode(uniq), ' 1'
    held[#held + 1] = uniq
    held[#held + 1] = id
  end
  local token = ARGV[3] .. j
  local k = 2 * j
  bodies[k - 1], bodies[k] = id, body
  metas[k - 1] = id
  metas[k] = head_text .. seq_text .. ',0,0,' .. g14(tonumber(ARGV[o + 4])) .. ',' .. now_text .. ','
    .. now_text .. ',' .. expire_texts[j] .. ',' .. uniq_json .. ',"",0,"",0]'
  leased[k - 1], leased[k] = deadline, id
  entries[k - 1] = id
  entries[k] = token .. ' ' .. deadline .. ' 1 ' .. ARGV[2] .. has_uniq
  k = 5 * j - 2
  out[k], out[k + 1], out[k + 2], out[k + 3], out[k + 4] = id, token, 1, body, latency
end
redis.call('HSET', K_BODY, unpack(bodies))
redis.call('HSET', K_META, unpack(metas))
if #held > 0 then redis.call('HSET', K_UNIQ, unpack(held)) end
redis.call('ZADD', K_LEASED, unpack(leased))
redis.call('HSET', K_LEASE, unpack(entries))
return {ids, out}
