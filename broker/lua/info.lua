-- One consistent snapshot of a queue's sizes, counters and pause flag (read-only).
-- Returns {ready, delayed, leased, dead, paused ('1' or ''), oldest run_at ('' if none), now,
--          counter name, value, counter name, value, ...}
local now = now_seconds()
local oldest = nil
-- The oldest waiting job is the head of one of the ten priority bands.
local heads = {}
for band = 0, 9 do
  local h = redis.call('ZRANGEBYSCORE', K_READY, band * SEQ_SPAN, (band + 1) * SEQ_SPAN - 1, 'LIMIT', 0, 1)
  if #h > 0 then heads[#heads + 1] = h[1] end
end
if #heads > 0 then
  for _, m in ipairs(redis.call('HMGET', K_META, unpack(heads))) do
    if m then
      local run_at = cjson.decode(m)[M_RUN_AT]
      if not oldest or run_at < oldest then oldest = run_at end
    end
  end
end
local out = {
  redis.call('ZCARD', K_READY), redis.call('ZCARD', K_DELAYED), redis.call('ZCARD', K_LEASED),
  redis.call('ZCARD', K_DEAD), redis.call('HGET', K_STATE, 'paused') or '', oldest and num(oldest) or '', num(now),
}
for _, v in ipairs(redis.call('HGETALL', K_STATS)) do out[#out + 1] = v end
return out
