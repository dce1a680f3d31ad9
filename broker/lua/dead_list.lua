-- A page of the dead-letter list, oldest failure first (read-only).
-- ARGV[1] offset   ARGV[2] limit
-- Returns {total, id1, meta1, body1, id2, ...}
local total = redis.call('ZCARD', K_DEAD)
local ids = redis.call('ZRANGE', K_DEAD, tonumber(ARGV[1]), tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1)
local out = {total}
if #ids == 0 then return out end
local metas = redis.call('HMGET', K_META, unpack(ids))
local bodies = redis.call('HMGET', K_BODY, unpack(ids))
for i, id in ipairs(ids) do
  if metas[i] and bodies[i] then
    out[#out + 1] = id
    out[#out + 1] = metas[i]
    out[#out + 1] = bodies[i]
  end
end
return out
