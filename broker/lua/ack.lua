-- Acknowledge leased jobs: each is removed for good if its token is its current lease token.
-- ARGV[1] wake channel, published when ARGV[2] is '1' and something was acked (the queue has a
--         max_inflight cap, so freed room may let a waiting deliverer go on)
-- ARGV[3..] pairs: id, token
-- Returns one status per pair: 1 acked, 0 unknown job, -1 stale token (expired, re-leased, acked)
-- This script handles, without the shared library (scripts.py, FRONTED), the case of every ack
-- done right: each job's lease entry holds its token and a deadline not past, no job twice. Any
-- other runs ack_general.lua (as general_script, after this one's reads only), which does the
-- same for these and knows the rest (stale tokens, leases taken before the lease hash): see
-- there, and _lib.lua's lease_entry for the entry's layout.
local n = (#ARGV - 2) / 2
if n < 1 or n % 1 ~= 0 then return general_script(ARGV, redis) end
local K_LEASED, K_BODY, K_META, K_UNIQ = KEYS[3], KEYS[6], KEYS[7], KEYS[8]
local K_STATS, K_DONE, K_LEASE = KEYS[9], KEYS[11], KEYS[12]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids, seen = {}, {}
for i = 1, n do
  local id = ARGV[2 * i + 1]
  if seen[id] then return general_script(ARGV, redis) end
  seen[id] = true
  ids[i] = id
end
local entries = redis.call('HMGET', K_LEASE, unpack(ids))
local out, tombstones, uniq_ids = {}, {}, {}
for i = 1, n do
  local entry, token = entries[i], ARGV[2 * i + 2]
  if not entry then return general_script(ARGV, redis) end
  -- 'token deadline attempt lease uniq'
  local space = string.find(entry, ' ', 1, true)
  if string.sub(entry, 1, space - 1) ~= token or tonumber(string.match(entry, '^(%S+)', space + 1)) < now then
    return general_script(ARGV, redis)
  end
  if string.byte(entry, -1) == 49 then uniq_ids[#uniq_ids + 1] = ids[i] end -- ends in '1'
  out[i] = 1
  tombstones[2 * i - 1], tombstones[2 * i] = now, ids[i]
end
-- The uniq keys to free, from the metas (slot 9), read before they go.
local uniqs = {}
if #uniq_ids > 0 then
  for _, raw in ipairs(redis.call('HMGET', K_META, unpack(uniq_ids))) do
    if raw then
      local uniq = cjson.decode(raw)[9]
      if uniq ~= '' then uniqs[#uniqs + 1] = uniq end
    end
  end
end
redis.call('ZREM', K_LEASED, unpack(ids))
redis.call('HDEL', K_LEASE, unpack(ids))
redis.call('HDEL', K_BODY, unpack(ids))
redis.call('HDEL', K_META, unpack(ids))
if #uniqs > 0 then redis.call('HDEL', K_UNIQ, unpack(uniqs)) end
redis.call('HINCRBY', K_STATS, 'processed', n)
redis.call('ZADD', K_DONE, unpack(tombstones))
if ARGV[2] == '1' then redis.call('PUBLISH', ARGV[1], '0') end
return out
