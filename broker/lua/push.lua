-- Push jobs (one HTTP request, or many coalesced ones, or a batch) atomically.
-- ARGV[1] wake channel (published when the ready set goes from empty to non-empty, or when a
--         delayed job becomes the earliest one: the payload is then its run_at)
-- ARGV[2] 1 to count each job as a failure too (presque's PUT "re-queue after failure")
-- ARGV[3] 1 when this call is part of a batch push that must be all-or-nothing on uniq conflicts
-- ARGV[4..] the jobs, in either of two layouts:
--   grouped (ARGV[4] is ''): groups of jobs sharing their options, each an options record
--           '', priority, delay seconds, ttl seconds (0 = none), uniq key ('' = none),
--           max_attempts, then id, body of each job of the group (ids are never '');
--   flat: 7 fields per job: id, body, priority, delay, ttl, uniq, max_attempts.
-- Returns one entry per job: its id, or '!' .. id of the existing job holding its uniq key.
-- The broker mints ids before the first try, so a call whose ids are already known is the
-- resend of one that ran but whose reply was lost (redis-py resends after a dropped connection;
-- the broker's own pipe never does): its jobs are not pushed twice. A job with a uniq key was
-- pushed by the first try if it holds its key; the others if their meta exists (one HMGET for
-- all). (A job of the first try already consumed by then is not known any more and is pushed
-- again; the resend follows the lost reply at once, so this is rare. Telling a resend by one
-- job instead would save ~4 % of the instructions per job, at the cost of pushing every job of
-- such a call again: not taken.)
--
-- Cost: this script runs for every pushed job, and Redis's CPU is what bounds a batch push
-- (docs/performance.md). Per job it only indexes ARGV, concatenates strings and looks up two
-- digits: number parsing (tonumber: strtod, twice) and '%g' formatting (glibc's printf_fp) were
-- most of its instructions, so options are parsed once per run of jobs sharing them, integers
-- are formatted with '%d' once per hundred (split below), and numbers go to redis.call as
-- strings (Redis would format a Lua number with '%.17g'). Each argument costs Redis a parse, a
-- Lua string and a free: the grouped layout sends 2 per job instead of 7.
local nargs = #ARGV
-- Job j: its id is ARGV[at[j]], its body the next one; its options start at ARGV[opt[j]]
-- (priority, delay, ttl, uniq, max_attempts). The flat layout needs no tables: 7j - 3 and 7j - 1.
local grouped = ARGV[4] == ''
local at, opt, job_ids, n = nil, nil, {}, 0
if grouped then
  at, opt = {}, {}
  local i, o = 4, nil
  while i <= nargs do
    if ARGV[i] == '' then
      o = i + 1
      i = i + 6
    else
      n = n + 1
      at[n] = i
      opt[n] = o
      job_ids[n] = ARGV[i]
      i = i + 2
    end
  end
else
  for i = 4, nargs, 7 do
    n = n + 1
    job_ids[n] = ARGV[i]
  end
end
local known = redis.call('HMGET', K_META, unpack(job_ids))
local out, accepted, taken = {}, {}, {}
local n_accepted, conflict = 0, false
for j = 1, n do
  local id, uniq = job_ids[j], nil
  if grouped then uniq = ARGV[opt[j] + 3] else uniq = ARGV[7 * j + 2] end
  out[j] = id
  if uniq == '' then
    if not known[j] then
      n_accepted = n_accepted + 1
      accepted[n_accepted] = j
    end
  else
    local existing = taken[uniq] or redis.call('HGET', K_UNIQ, uniq)
    if existing == id then
      -- pushed by the first try of this call
    elseif existing then
      out[j] = '!' .. existing
      conflict = true
    else
      taken[uniq] = id
      n_accepted = n_accepted + 1
      accepted[n_accepted] = j
    end
  end
end
if n_accepted == 0 or (conflict and ARGV[3] == '1') then return out end

local now = now_seconds()
local was_empty = redis.call('EXISTS', K_READY) == 0
local seq = redis.call('HINCRBY', K_STATS, 'pushed', n_accepted) - n_accepted
if ARGV[2] == '1' then redis.call('HINCRBY', K_STATS, 'failed', n_accepted) end

local bodies, metas, ready, delayed, expiry, uniqs = {}, {}, {}, {}, {}, {}
local nb, nm, nr, nd, ne, nu = 0, 0, 0, 0, 0, 0
local earliest = nil

-- Decimal texts of consecutive integers (seq, ready scores) cost a string.format (a sprintf) only
-- once per hundred: split(x) gives x's digits but the last two, and those two as a number; the
-- next 99 integers take theirs from TWO_DIGITS. Numbers below 100, and seqs from 10^14 on (which
-- '%.14g' writes in exponent form, as cjson would), are formatted whole, each time (lo = 99), as
-- are all in a call of few jobs (the table would cost more than it saves).
local TWO_DIGITS = n_accepted > 2 and {[0] = '00',
  '01', '02', '03', '04', '05', '06', '07', '08', '09', '10', '11',
  '12', '13', '14', '15', '16', '17', '18', '19', '20', '21', '22', '23', '24', '25', '26', '27',
  '28', '29', '30', '31', '32', '33', '34', '35', '36', '37', '38', '39', '40', '41', '42', '43',
  '44', '45', '46', '47', '48', '49', '50', '51', '52', '53', '54', '55', '56', '57', '58', '59',
  '60', '61', '62', '63', '64', '65', '66', '67', '68', '69', '70', '71', '72', '73', '74', '75',
  '76', '77', '78', '79', '80', '81', '82', '83', '84', '85', '86', '87', '88', '89', '90', '91',
  '92', '93', '94', '95', '96', '97', '98', '99'} or nil

-- Returns head, lo, tail with head .. tail the text of integer x (below 2^53, where '%d' and
-- '%.17g' agree); as_meta: as '%.14g' writes it.
local function split(x, as_meta)
  if as_meta and x >= 1e14 then return '', 99, string.format('%.14g', x) end
  if x < 100 or not TWO_DIGITS then return '', 99, string.format('%d', x) end
  local lo = x % 100
  return string.format('%d', (x - lo) / 100), lo, TWO_DIGITS[lo]
end

-- What '%.14g' writes for x, through '%d' (no glibc printf_fp) when that writes the same.
local function g14(x)
  if x >= 1 and x < 1e14 and x % 1 == 0 then return string.format('%d', x) end
  return string.format('%.14g', x)
end

-- The meta array is written by concatenation (what cjson.encode would write, numbers as
-- '%.14g', for a fraction of its cost): {priority, seq, attempt 0, failures 0, max_attempts,
-- created_at, run_at, expire_at, uniq, token '', lease 0, last_error '', failed_at 0}. Between
-- jobs of the same options only seq and uniq differ: the rest is `head` and `mid`.
local now_text = string.format('%.14g', now)
local last_priority, last_delay, last_ttl, last_max -- the ARGV strings `head`... were made from
local head, mid, score_base, run_at, run_at_score, expire_score, is_delayed
local seq_head, seq_lo, seq_tail = '', 99, '' -- lo 99: the first job splits
local score_head, score_lo, score_tail
local last_opt
for k = 1, n_accepted do
  local j = accepted[k]
  local id, o, body = job_ids[j], nil, nil
  if grouped then
    o, body = opt[j], ARGV[at[j] + 1]
  else
    o, body = 7 * j - 1, ARGV[7 * j - 2]
  end
  local uniq = ARGV[o + 3]
  seq = seq + 1
  if seq_lo < 99 then
    seq_lo = seq_lo + 1
    seq_tail = TWO_DIGITS[seq_lo]
  else
    seq_head, seq_lo, seq_tail = split(seq, true)
  end
  local p, d, t, m
  if o ~= last_opt then
    last_opt = o
    p, d, t, m = ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 4]
  end
  if p and (p ~= last_priority or d ~= last_delay or t ~= last_ttl or m ~= last_max) then
    last_priority, last_delay, last_ttl, last_max = p, d, t, m
    local priority, delay, ttl = tonumber(p), tonumber(d), tonumber(t)
    run_at = now + delay
    is_delayed = delay > 0
    local run_at_text = now_text
    if delay ~= 0 then run_at_text = string.format('%.14g', run_at) end
    -- Scores as Redis writes a number given to ZADD.
    if is_delayed then run_at_score = string.format('%.17g', run_at) end
    local expire_text = '0'
    expire_score = nil
    if ttl > 0 then
      expire_text = string.format('%.14g', run_at + ttl)
      expire_score = string.format('%.17g', run_at + ttl)
    end
    head = '[' .. g14(priority) .. ','
    mid = ',0,0,' .. g14(tonumber(m)) .. ',' .. now_text .. ',' .. run_at_text .. ','
      .. expire_text .. ','
    score_base = (9 - priority) * SEQ_SPAN
    score_head, score_lo, score_tail = split(score_base + seq, false)
  elseif not is_delayed then
    if score_lo < 99 then
      score_lo = score_lo + 1
      score_tail = TWO_DIGITS[score_lo]
    else
      score_head, score_lo, score_tail = split(score_base + seq, false)
    end
  end
  local uniq_json = '""'
  if uniq ~= '' then uniq_json = cjson.encode(uniq) end
  bodies[nb + 1] = id
  bodies[nb + 2] = body
  nb = nb + 2
  metas[nm + 1] = id
  metas[nm + 2] = head .. seq_head .. seq_tail .. mid .. uniq_json .. ',"",0,"",0]'
  nm = nm + 2
  if expire_score then
    expiry[ne + 1] = expire_score
    expiry[ne + 2] = id
    ne = ne + 2
  end
  if is_delayed then
    delayed[nd + 1] = run_at_score
    delayed[nd + 2] = id
    nd = nd + 2
    if not earliest or run_at < earliest then earliest = run_at end
  else
    ready[nr + 1] = score_head .. score_tail
    ready[nr + 2] = id
    nr = nr + 2
  end
  if uniq ~= '' then
    uniqs[nu + 1] = uniq
    uniqs[nu + 2] = id
    nu = nu + 2
  end
end

redis.call('HSET', K_BODY, unpack(bodies))
redis.call('HSET', K_META, unpack(metas))
if nr > 0 then
  redis.call('ZADD', K_READY, unpack(ready))
  if was_empty then redis.call('PUBLISH', ARGV[1], '0') end
end
if nd > 0 then
  local head_job = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  redis.call('ZADD', K_DELAYED, unpack(delayed))
  if #head_job == 0 or earliest < tonumber(head_job[2]) then redis.call('PUBLISH', ARGV[1], num(earliest)) end
end
if ne > 0 then redis.call('ZADD', K_EXPIRY, unpack(expiry)) end
if nu > 0 then redis.call('HSET', K_UNIQ, unpack(uniqs)) end
return out
