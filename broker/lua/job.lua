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
  if score then
    local entry = pair[1] == 'leased' and redis.call('HGET', K_LEASE, id)
    local decoded = entry and cjson.decode(meta)
    if decoded and decoded[M_TOKEN] == '' then
      -- While leased, the current attempt is in the lease entry, not (yet) in the meta.
      local _, _, attempt, lease = parse_lease(entry)
      decoded[M_ATTEMPT], decoded[M_LEASE] = attempt, lease
      meta = cjson.encode(decoded)
    end
    return {pair[1], meta, body, score}
  end
end
return {}
