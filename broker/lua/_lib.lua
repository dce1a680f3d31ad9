-- Shared helpers, prepended by scripts.py to every script below (Redis has no Lua modules).
-- Every script receives the queue's keys in this order (keys.QueueKeys.all()):
-- KEYS[1] ready    zset id -> (9 - priority) * 2^48 + seq
-- KEYS[2] delayed  zset id -> run_at
-- KEYS[3] leased   zset id -> lease deadline
-- KEYS[4] dead     zset id -> failed_at
-- KEYS[5] expiry   zset id -> expire_at (ttl jobs while ready or delayed)
-- KEYS[6] body     hash id -> body bytes
-- KEYS[7] meta     hash id -> cjson array, slots below (models.Meta); written by push and by the
--                  rare paths (nack, reap, release, dead_retry), never by fetch or ack
-- KEYS[8] uniq     hash uniq -> id
-- KEYS[9] stats    hash of counters
-- KEYS[10] state   hash: paused, rate_tokens, rate_at
-- KEYS[11] done    zset id -> completed_at: tombstones of recent acks, trimmed by reap.lua
-- KEYS[12] lease   hash id -> lease entry of a leased job (see lease_entry below)
local K_READY, K_DELAYED, K_LEASED, K_DEAD, K_EXPIRY = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_BODY, K_META, K_UNIQ, K_STATS, K_STATE = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_DONE, K_LEASE = KEYS[11], KEYS[12]

local SEQ_SPAN = 281474976710656 -- 2^48
local M_PRIORITY, M_SEQ, M_ATTEMPT, M_FAILURES, M_MAX_ATTEMPTS = 1, 2, 3, 4, 5
local M_CREATED_AT, M_RUN_AT, M_EXPIRE_AT, M_UNIQ, M_TOKEN = 6, 7, 8, 9, 10
local M_LEASE, M_LAST_ERROR, M_FAILED_AT = 11, 12, 13

-- One clock for every broker process: Redis's.
local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function ready_score(meta)
  return (9 - meta[M_PRIORITY]) * SEQ_SPAN + meta[M_SEQ]
end

-- Lua numbers reach the client truncated to integers; floats travel as strings.
local function num(x)
  return string.format('%.6f', x)
end

-- The slots fetch needs, read from the head of a meta array without decoding all of it: slots 1-8
-- are numbers, which cjson writes without commas, and slot 9 (uniq) is the first string.
local META_HEAD = '^%[[^,]*,[^,]*,([^,]*),[^,]*,[^,]*,[^,]*,([^,]*),([^,]*),(..)'

-- Returns attempt, run_at, expire_at (numbers) and whether the job has a uniq key.
local function meta_head(raw)
  local attempt, run_at, expire_at, uniq = string.match(raw, META_HEAD)
  if not attempt then
    local meta = cjson.decode(raw)
    return meta[M_ATTEMPT], meta[M_RUN_AT], meta[M_EXPIRE_AT], meta[M_UNIQ] ~= ''
  end
  return tonumber(attempt), tonumber(run_at), tonumber(expire_at), uniq ~= '""'
end

-- A leased job's lease lives in the lease hash, not in its meta, so that fetch and ack neither
-- decode, re-encode nor rewrite the meta. The entry is 'token deadline attempt lease uniq':
-- deadline as in the leased set (ack checks it here, without a ZMSCORE), attempt this delivery's
-- (the meta keeps the count before it until the lease ends), lease the seconds it was taken for
-- (touch's default), uniq 1 when the job has a uniq key (ack must then free it), else 0.
-- Tokens never contain a space. deadline and lease are strings as given to ZADD.
local function lease_entry(token, deadline, attempt, lease, has_uniq)
  if has_uniq then return token .. ' ' .. deadline .. ' ' .. attempt .. ' ' .. lease .. ' 1' end
  return token .. ' ' .. deadline .. ' ' .. attempt .. ' ' .. lease .. ' 0'
end

-- Returns token, deadline, attempt, lease seconds (numbers) and has_uniq.
local function parse_lease(entry)
  local token, deadline, attempt, lease, uniq = string.match(entry, '^(%S+) (%S+) (%S+) (%S+) (%d)$')
  return token, tonumber(deadline), tonumber(attempt), tonumber(lease), uniq == '1'
end

-- A lease ends without the job being acked (nack, expiry, release): the meta takes its attempt
-- count back and holds no token (a lease taken before the lease hash existed had it there, and
-- then it is the current one: an entry beside it is a leftover, see check_lease).
local function end_lease(meta, entry)
  if entry and meta[M_TOKEN] == '' then
    local _, _, attempt = parse_lease(entry)
    meta[M_ATTEMPT] = attempt
  end
  meta[M_TOKEN] = ''
end

-- The uniq keys held by these jobs (read from their meta: only for jobs known to have one).
local function uniqs_of(ids)
  local uniqs = {}
  if #ids == 0 then return uniqs end
  for _, raw in ipairs(redis.call('HMGET', K_META, unpack(ids))) do
    if raw then
      local uniq = cjson.decode(raw)[M_UNIQ]
      if uniq ~= '' then uniqs[#uniqs + 1] = uniq end
    end
  end
  return uniqs
end

local function uniqs_of_metas(metas)
  local uniqs = {}
  for _, meta in ipairs(metas) do
    if meta[M_UNIQ] ~= '' then uniqs[#uniqs + 1] = meta[M_UNIQ] end
  end
  return uniqs
end

-- Forget jobs entirely (acked, fetched destructively, expired, purged, deleted), with the uniq
-- keys they held. A leased job's lease entry is its caller's to delete.
local function drop_jobs(ids, uniqs)
  if #ids == 0 then return end
  redis.call('HDEL', K_BODY, unpack(ids))
  redis.call('HDEL', K_META, unpack(ids))
  if #uniqs > 0 then redis.call('HDEL', K_UNIQ, unpack(uniqs)) end
end

-- Put a job (not in any set) back where its run_at says: ready now, or delayed.
local function schedule(id, meta, now)
  if meta[M_RUN_AT] <= now then
    redis.call('ZADD', K_READY, ready_score(meta), id)
    return true
  end
  redis.call('ZADD', K_DELAYED, meta[M_RUN_AT], id)
  return false
end

-- Counters of a batch, added to the stats hash once per script call (count_stats).
local FAIL_COUNTERS = {'failed', 'dead_lettered', 'expired', 'retried'}

local function count_stats(counts)
  for _, name in ipairs(FAIL_COUNTERS) do
    if counts[name] > 0 then redis.call('HINCRBY', K_STATS, name, counts[name]) end
  end
end

-- A delivery failed (nack or lease expiry): retry with backoff, or dead-letter after
-- max_attempts failures. The job must already be out of the leased set.
-- delay < 0 means exponential backoff base * 2^(failures-1), capped, with +-20% jitter.
-- counts: {failed = 0, dead_lettered = 0, expired = 0, retried = 0}, for count_stats.
-- Returns 'dead', 'expired', 'ready' or 'delayed'.
local function fail_job(id, meta, now, err, delay, base, cap, counts)
  meta[M_FAILURES] = meta[M_FAILURES] + 1
  meta[M_LAST_ERROR] = err
  meta[M_TOKEN] = ''
  counts.failed = counts.failed + 1
  if meta[M_FAILURES] >= meta[M_MAX_ATTEMPTS] then
    meta[M_FAILED_AT] = now
    redis.call('ZADD', K_DEAD, now, id)
    counts.dead_lettered = counts.dead_lettered + 1
    if meta[M_UNIQ] ~= '' then redis.call('HDEL', K_UNIQ, meta[M_UNIQ]) end
    redis.call('HSET', K_META, id, cjson.encode(meta))
    return 'dead'
  end
  if delay < 0 then
    delay = base * 2 ^ (meta[M_FAILURES] - 1)
    if delay > cap then delay = cap end
    delay = delay * (0.8 + 0.4 * math.random())
  end
  meta[M_RUN_AT] = now + delay
  if meta[M_EXPIRE_AT] > 0 and meta[M_RUN_AT] > meta[M_EXPIRE_AT] then
    -- Its retry would come after its ttl: never deliver late.
    counts.expired = counts.expired + 1
    drop_jobs({id}, uniqs_of_metas({meta}))
    return 'expired'
  end
  counts.retried = counts.retried + 1
  redis.call('HSET', K_META, id, cjson.encode(meta))
  if meta[M_EXPIRE_AT] > 0 then redis.call('ZADD', K_EXPIRY, meta[M_EXPIRE_AT], id) end
  if schedule(id, meta, now) then return 'ready' end
  return 'delayed'
end

-- Move delayed jobs whose time has come to the ready set (at most `limit`). Returns how many
-- moved, and the run_at (as Redis wrote it) of the earliest delayed job left, false when there
-- is none, or nil when jobs moved (then it was not looked up). When none is due, as is usual,
-- that costs one look-up at the head of the delayed set, which fetch would need anyway.
local function promote_due(now, limit)
  local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  if #head == 0 then return 0, false end
  if tonumber(head[2]) > now then return 0, head[2] end
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, limit)
  local metas = redis.call('HMGET', K_META, unpack(due))
  local zargs = {}
  for i, id in ipairs(due) do
    if metas[i] then
      -- Priority and seq are the meta's first slots: no need to decode the rest.
      local priority, seq = string.match(metas[i], '^%[([^,]*),([^,]*),')
      if not priority then
        local meta = cjson.decode(metas[i])
        priority, seq = meta[M_PRIORITY], meta[M_SEQ]
      end
      zargs[#zargs + 1] = (9 - tonumber(priority)) * SEQ_SPAN + tonumber(seq)
      zargs[#zargs + 1] = id
    end
  end
  if #zargs > 0 then redis.call('ZADD', K_READY, unpack(zargs)) end
  redis.call('ZREM', K_DELAYED, unpack(due))
  return #due, nil
end

-- The hint of an empty ready set: the run_at of the next delayed job, or ''. `known` is what
-- promote_due said.
local function next_run_at(known)
  if known == nil then
    local head = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
    return head[2] or ''
  end
  return known or ''
end

-- The lease check shared by ack, nack, touch and release: 1 ok, 0 unknown job, -1 stale token.
-- On 1, also returns the job's lease entry. A lease taken by a broker from before the lease hash
-- has no entry but its token in the meta (slot M_TOKEN): it still settles, with an entry made
-- from the meta (whose attempt already counted that delivery). While both versions run, an
-- old process's reaper may end a lease and leave its entry behind (with a past deadline, so it
-- settles nothing), and an old fetch may lease the job again in the meta: a token that is not
-- the entry's is therefore checked against the meta before it is called stale.
local function check_lease(id, entry, token, now, allow_expired)
  if entry and string.sub(entry, 1, string.find(entry, ' ', 1, true) - 1) == token then
    if not allow_expired and tonumber(string.match(entry, '^%S+ (%S+)')) < now then return -1, nil end
    return 1, entry
  end
  local raw = redis.call('HGET', K_META, id)
  if not raw then
    -- Acked a moment ago: that is a stale token (409), not an unknown job (404).
    if redis.call('ZSCORE', K_DONE, id) then return -1, nil end
    return 0, nil
  end
  local meta = cjson.decode(raw)
  if meta[M_TOKEN] == '' or meta[M_TOKEN] ~= token then return -1, nil end
  local deadline = redis.call('ZSCORE', K_LEASED, id)
  if not deadline then return -1, nil end
  if not allow_expired and tonumber(deadline) < now then return -1, nil end
  return 1, lease_entry(token, deadline, meta[M_ATTEMPT], meta[M_LEASE], meta[M_UNIQ] ~= '')
end
