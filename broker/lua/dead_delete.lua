-- Delete dead-lettered jobs for good.
-- ARGV[1] limit when deleting all   ARGV[2..] ids, or none for all (called until it returns 0)
-- Returns the number deleted.
local ids = {}
if #ARGV >= 2 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', K_DEAD, 0, tonumber(ARGV[1]) - 1)
end
if #ids == 0 then return 0 end
local scores = redis.call('ZMSCORE', K_DEAD, unpack(ids))
local gone = {}
for i, id in ipairs(ids) do
  if scores[i] then
    gone[#gone + 1] = id
  end
end
if #gone == 0 then return 0 end
-- Dead jobs already gave their uniq key back; only body and meta remain.
redis.call('ZREM', K_DEAD, unpack(gone))
redis.call('HDEL', K_BODY, unpack(gone))
redis.call('HDEL', K_META, unpack(gone))
redis.call('HDEL', K_LEASE, unpack(gone)) -- only ever a leftover of an old broker's reaper (_lib.lua)
return #gone
