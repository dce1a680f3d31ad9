-- Put dead-lettered jobs back in the ready set with their failures reset (ids keep).
-- ARGV[1] wake channel   ARGV[2] limit when retrying all   ARGV[3..] ids, or none for all
-- (retry-all is called repeatedly until it returns 0).
-- A retried job gets its uniq key back if no other live job took it meanwhile; a retried job's
-- ttl no longer applies (someone asked for it explicitly).
-- Returns the number retried.
local now = now_seconds()
local ids = {}
if #ARGV >= 3 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', K_DEAD, 0, tonumber(ARGV[2]) - 1)
end
if #ids == 0 then return 0 end
local scores = redis.call('ZMSCORE', K_DEAD, unpack(ids))
local metas = redis.call('HMGET', K_META, unpack(ids))
local ready, meta_args, moved = {}, {}, {}
for i, id in ipairs(ids) do
  if scores[i] and metas[i] and not moved[id] then
    moved[id] = true
    local meta = cjson.decode(metas[i])
    meta[M_FAILURES] = 0
    meta[M_FAILED_AT] = 0
    meta[M_RUN_AT] = now
    meta[M_EXPIRE_AT] = 0
    if meta[M_UNIQ] ~= '' and redis.call('HSETNX', K_UNIQ, meta[M_UNIQ], id) == 0 then meta[M_UNIQ] = '' end
    ready[#ready + 1] = ready_score(meta)
    ready[#ready + 1] = id
    meta_args[#meta_args + 1] = id
    meta_args[#meta_args + 1] = cjson.encode(meta)
  end
end
if #ready == 0 then return 0 end
local moved_ids = {}
for i = 2, #ready, 2 do moved_ids[#moved_ids + 1] = ready[i] end
redis.call('ZREM', K_DEAD, unpack(moved_ids))
redis.call('ZADD', K_READY, unpack(ready))
redis.call('HSET', K_META, unpack(meta_args))
redis.call('HINCRBY', K_STATS, 'retried', #moved_ids)
redis.call('PUBLISH', ARGV[1], '0')
return #moved_ids
