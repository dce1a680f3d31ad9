-- The bodies of the next ready jobs, in delivery order (read-only).
-- ARGV[1] how many
-- Returns {id1, body1, id2, body2, ...}
local ids = redis.call('ZRANGE', K_READY, 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return {} end
local bodies = redis.call('HMGET', K_BODY, unpack(ids))
local out = {}
for i, id in ipairs(ids) do
  if bodies[i] then
    out[#out + 1] = id
    out[#out + 1] = bodies[i]
  end
end
return out
