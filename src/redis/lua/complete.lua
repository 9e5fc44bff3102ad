-- complete: an attempt succeeded; stores the result and, in the same round trip,
-- claims the worker's next jobs.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] id, ARGV[4] lease token, ARGV[5] result bytes
-- ARGV[6] worker id, ARGV[7] jobs to claim next (0 for none), ARGV[8] lease ms, ARGV[9] default max attempts
-- Returns: {outcome, claim...} with outcome 'completed', 'cancelled' or 'lost'
-- (the lease is no longer this worker's: nothing was changed)
local id, token = ARGV[3], ARGV[4]
local outcome = 'lost'
if owned(id, token) then
  local job = load(id)
  if job and job.corrupt then
    bury(job, 'corrupt job record: ' .. job.corrupt)
    outcome = 'dead'
  elseif job and job.cancel then
    finish(job, 'cancelled')
    outcome = 'cancelled'
  elseif job then
    window(1, 0, NOW - (job.started_at or NOW))
    redis.call('HSET', K_RESULTS, id, ARGV[5])
    job.result = true
    job.progress = 100
    finish(job, 'completed')
    outcome = 'completed'
  else
    release_lease(id)
  end
end
return and_claim_next(outcome, 6)
