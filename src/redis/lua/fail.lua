-- fail: an attempt failed; records the error and either schedules the retry or
-- buries the job in the dead letters. The client's RetryPolicy chose which.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] id, ARGV[4] lease token, ARGV[5] error kind, ARGV[6] error message
-- ARGV[7] ms until the retry, on Redis's clock ('': no retry, the job is dead)
-- ARGV[8] worker id, ARGV[9] jobs to claim next (0 for none), ARGV[10] lease ms, ARGV[11] default max attempts
-- Returns: {outcome, claim...} with outcome 'retrying', 'dead', 'cancelled' or 'lost'
local id, token = ARGV[3], ARGV[4]
local outcome = 'lost'
if owned(id, token) then
  local job = load(id)
  if job and job.corrupt then
    bury(job, 'corrupt job record: ' .. job.corrupt)
    outcome = 'dead'
  elseif job then
    record_error(job, ARGV[5], ARGV[6])
    count('failed')
    window(0, 1, NOW - (job.started_at or NOW))
    local retry_in = tonumber(ARGV[7])
    if job.cancel then
      finish(job, 'cancelled')
      outcome = 'cancelled'
    elseif retry_in then
      local retry_at = NOW + math.max(retry_in, 1)
      release_lease(id)
      job.state = 'scheduled'
      job.run_at = retry_at
      redis.call('ZADD', K_SCHEDULED, int(retry_at), id)
      save(job)
      count('retried')
      emit('retrying', id, ARGV[6])
      wake(1)
      outcome = 'retrying'
    else
      bury(job, ARGV[6])
      outcome = 'dead'
    end
  else
    release_lease(id)
  end
end
return and_claim_next(outcome, 8)
