-- A consumer failed a leased job: retry it after a delay, or dead-letter it.
-- ARGV[1] wake channel   ARGV[2] id   ARGV[3] token
-- ARGV[4] delay seconds, or -1 for the queue's exponential backoff
-- ARGV[5] error text     ARGV[6] backoff base   ARGV[7] backoff cap   ARGV[8] random seed
-- Returns {status, outcome, run_at}: status 1 ok / 0 unknown / -1 stale;
--   outcome 'ready' | 'delayed' | 'dead' | 'expired'
local now = now_seconds()
math.randomseed(tonumber(ARGV[8]))
local id = ARGV[2]
local status, entry = check_lease(id, redis.call('HGET', K_LEASE, id), ARGV[3], now, false)
if status ~= 1 then return {status, '', ''} end
local meta = cjson.decode(redis.call('HGET', K_META, id))
redis.call('ZREM', K_LEASED, id)
redis.call('HDEL', K_LEASE, id)
end_lease(meta, entry)
local counts = {failed = 0, dead_lettered = 0, expired = 0, retried = 0}
local outcome = fail_job(id, meta, now, ARGV[5], tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7]), counts)
count_stats(counts)
if outcome == 'ready' then redis.call('PUBLISH', ARGV[1], '0') end
if outcome == 'delayed' then redis.call('PUBLISH', ARGV[1], num(meta[M_RUN_AT])) end
return {1, outcome, num(meta[M_RUN_AT])}
