-- release: a worker hands an unfinished job back (graceful shutdown) so it runs again
-- at once, at the head of its lane, instead of after a lease timeout. The interrupted
-- attempt is not counted.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] id, ARGV[4] lease token
-- Returns: 'released', 'cancelled', 'dead' (unusable record, buried) or 'lost'
local id = ARGV[3]
local job, outcome = reported(id, ARGV[4], true)
if not job then
  return outcome
end
release_lease(job)
job.attempts = math.max((job.attempts or 1) - 1, 0)
push_ready(job, true)
save(job)
emit('released', id)
wake(1)
return 'released'
