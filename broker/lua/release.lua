-- Give leased jobs back without counting a failure: their consumer disconnected, unsubscribed
-- or the broker is shutting down. They go back to their place in the ready set at once
-- (their original sequence number puts them ahead of everything pushed after them).
-- A lease that has already expired but was not yet reaped is released too: it is going back.
-- ARGV[1] wake channel   ARGV[2..] pairs: id, token
-- Returns the number of jobs released.
local now = now_seconds()
local ids, tokens = {}, {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  tokens[#tokens + 1] = ARGV[i + 1]
end
local entries = redis.call('HMGET', K_LEASE, unpack(ids))
local deadlines = redis.call('ZMSCORE', K_LEASED, unpack(ids))
local metas = redis.call('HMGET', K_META, unpack(ids))
local released, seen, ready, meta_args, expiry, dropped, dropped_metas = {}, {}, {}, {}, {}, {}, {}
for i, id in ipairs(ids) do
  local status, entry = check_lease(id, entries[i], tokens[i], now, true)
  local meta = status == 1 and cjson.decode(metas[i])
  -- An expired lease is released too, but only while it is still this token's: still in the
  -- leased set, and not leased again in the meta by an old process (see check_lease).
  if meta and deadlines[i] and (meta[M_TOKEN] == '' or meta[M_TOKEN] == tokens[i]) and not seen[id] then
    seen[id] = true
    released[#released + 1] = id
    end_lease(meta, entry)
    if meta[M_EXPIRE_AT] > 0 and meta[M_EXPIRE_AT] < now then
      dropped[#dropped + 1] = id
      dropped_metas[#dropped_metas + 1] = meta
    else
      ready[#ready + 1] = ready_score(meta)
      ready[#ready + 1] = id
      meta_args[#meta_args + 1] = id
      meta_args[#meta_args + 1] = cjson.encode(meta)
      if meta[M_EXPIRE_AT] > 0 then
        expiry[#expiry + 1] = meta[M_EXPIRE_AT]
        expiry[#expiry + 1] = id
      end
    end
  end
end
if #released == 0 then return 0 end
redis.call('ZREM', K_LEASED, unpack(released))
redis.call('HDEL', K_LEASE, unpack(released))
if #ready > 0 then
  redis.call('ZADD', K_READY, unpack(ready))
  redis.call('HSET', K_META, unpack(meta_args))
  redis.call('PUBLISH', ARGV[1], '0')
end
if #expiry > 0 then redis.call('ZADD', K_EXPIRY, unpack(expiry)) end
if #dropped > 0 then
  drop_jobs(dropped, uniqs_of_metas(dropped_metas))
  redis.call('HINCRBY', K_STATS, 'expired', #dropped)
end
return #released
