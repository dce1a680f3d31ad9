-- One job's state (read-only).
-- ARGV[1] id
-- Returns {} when unknown, else {state, meta json, body, score} where state is
-- ready | delayed | leased | dead.
local id = ARGV[1]
local meta = redis.call('HGET', K_META, id)
if not meta then return {} end
local body = redis.call('HGET', K_BODY, id)
for _, pair in ipairs({{'ready', K_READY}, {'delayed', K_DELAYED}, {'leased', K_LEASED}, {'dead', K_DEAD}}) do
  local score = redis.call('ZSCORE', pair[2], id)
  if score then return {pair[1], meta, body, score} end
end
return {}
