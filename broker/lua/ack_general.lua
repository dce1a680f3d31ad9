-- ack.lua's general path (ack.lua handles the common case itself and runs this one, as
-- general_script, for the others).
-- Acknowledge leased jobs: each is removed for good if its token is its current lease token.
-- ARGV[1] wake channel, published when ARGV[2] is '1' and something was acked (the queue has a
--         max_inflight cap, so freed room may let a waiting deliverer go on)
-- ARGV[3..] pairs: id, token
-- Returns one status per pair: 1 acked, 0 unknown job, -1 stale token (expired, re-leased, acked)
-- The common case reads only the lease hash: no meta is read or decoded, except to free the uniq
-- keys of the jobs whose lease entry says they hold one.
local now = now_seconds()
local ids, tokens = {}, {}
for i = 3, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  tokens[#tokens + 1] = ARGV[i + 1]
end
local entries = redis.call('HMGET', K_LEASE, unpack(ids))
local out, done_ids, uniq_ids, seen, tombstones = {}, {}, {}, {}, {}
for i, id in ipairs(ids) do
  local status, entry = check_lease(id, entries[i], tokens[i], now, false)
  if status == 1 and seen[id] then status = -1 end
  out[i] = status
  if status == 1 then
    seen[id] = true
    done_ids[#done_ids + 1] = id
    if string.byte(entry, -1) == 49 then uniq_ids[#uniq_ids + 1] = id end -- ends in '1'
    tombstones[#tombstones + 1] = now
    tombstones[#tombstones + 1] = id
  end
end
if #done_ids > 0 then
  redis.call('ZREM', K_LEASED, unpack(done_ids))
  redis.call('HDEL', K_LEASE, unpack(done_ids))
  drop_jobs(done_ids, uniqs_of(uniq_ids))
  redis.call('HINCRBY', K_STATS, 'processed', #done_ids)
  redis.call('ZADD', K_DONE, unpack(tombstones))
  if ARGV[2] == '1' then redis.call('PUBLISH', ARGV[1], '0') end
end
return out
