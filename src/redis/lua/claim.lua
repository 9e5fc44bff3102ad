-- claim: hands up to n ready jobs to a worker, each under a fresh lease that starts
-- now, on Redis's clock.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] worker id, ARGV[4] n, ARGV[5] lease ms, ARGV[6] default max attempts
-- Returns: {ms until the next wake-up or -1, then per job: id, lease token, entry (the
--          record JSON, a newline, the payload: one string, see `claim`)}
-- Counters and events are written once for the whole claim (see start_batch).
start_batch()
local out = claim(ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
end_batch()
return out
