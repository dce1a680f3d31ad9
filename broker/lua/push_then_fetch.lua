-- push_fetch.lua's general path (push_fetch.lua handles the common case itself and runs this one,
-- as general_script, for the others). Push jobs, then take jobs from the queue's head for this
-- broker's waiting subscribers, in one call: push.lua's body, then fetch.lua's, each run as it is
-- (scripts.py wraps them as the local functions push_script and fetch_script), so that what is
-- taken, and how, is exactly a fetch's (FIFO within a priority, delayed jobs promoted, paused,
-- rate limit, max_inflight, ttl, leases). It saves the round trips of the wake-up and of the
-- fetch that would follow the push.
-- ARGV[1..5] fetch.lua's ARGV: count, lease seconds, token prefix, max_inflight, rate
-- ARGV[6..] push.lua's ARGV: wake channel, count failure, all or nothing, the jobs (either layout)
-- Returns {push.lua's reply, fetch.lua's reply}.
-- push.lua's wake-up for ready work ('0', published when the ready set goes from empty to
-- non-empty) is held back and published only if the fetch left ready jobs: none is due when this
-- broker took them all. Its wake-up for a delayed job (payload run_at) goes out as it is.
local real = redis
local held_wake = nil
local held = setmetatable({
  call = function(command, ...)
    if string.upper(command) == 'PUBLISH' and select(2, ...) == '0' then
      held_wake = ...
      return 0
    end
    return real.call(command, ...)
  end,
}, {__index = real})

local fetch_args, push_args = {}, {}
for i = 1, 5 do fetch_args[i] = ARGV[i] end
for i = 6, #ARGV do push_args[i - 5] = ARGV[i] end

local pushed = push_script(push_args, held)
local fetched = fetch_script(fetch_args, real)
if held_wake then
  -- Whether ready jobs are left, as fetch.lua's reply tells it: '+' after jobs, nothing when empty.
  local left
  if fetched[1] == 1 then
    left = fetched[2] == '+'
  elseif fetched[1] == 0 then
    left = false
  else
    left = real.call('EXISTS', K_READY) == 1 -- paused or limited: fetch did not look
  end
  if left then real.call('PUBLISH', held_wake, '0') end
end
return {pushed, fetched}
