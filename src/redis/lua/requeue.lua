-- requeue: gives dead jobs another life. Each id still in the dead letters goes back to
-- ready at its original priority, behind the jobs already waiting (the tail of its
-- lane), with its attempts reset and its error history kept so operators can still
-- see what happened. The id is kept, so anyone waiting on it gets the new result.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3..] job ids (the client sends bounded batches)
-- Returns: how many jobs were requeued. Ids not in the dead letters are skipped; a
-- dead-letter entry whose record is gone is dropped (there is nothing left to run).
local requeued = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', K_DEAD, id) then
    redis.call('ZREM', K_DEAD, id)
    local job = load(id)
    if job then
      job.attempts = 0
      job.reason = nil
      job.finished_at = nil
      job.started_at = nil
      job.worker = nil
      job.progress = nil
      job.run_at = nil
      -- An operator asked for this run: a time-to-live that passed while it lay dead
      -- must not expire it on the spot.
      job.expires_at = nil
      push_ready(job, false)
      save(job)
      count('requeued')
      emit('requeued', id)
      requeued = requeued + 1
    end
  end
end
wake(requeued)
return requeued
