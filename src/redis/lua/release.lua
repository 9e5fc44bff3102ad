-- release: a worker hands an unfinished job back (graceful shutdown) so it runs again
-- at once instead of after a lease timeout. The interrupted attempt is not counted.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] id, ARGV[4] lease token
-- Returns: 'released', 'cancelled' or 'lost'
local id, token = ARGV[3], ARGV[4]
if not owned(id, token) then
  return 'lost'
end
local job = load(id)
if not job then
  release_lease(id)
  return 'lost'
end
if job.corrupt then
  bury(job, 'corrupt job record: ' .. job.corrupt)
  return 'dead'
end
if job.cancel then
  finish(job, 'cancelled')
  return 'cancelled'
end
release_lease(id)
job.attempts = math.max((job.attempts or 1) - 1, 0)
push_ready(job, false)
save(job)
emit('released', id)
wake(1)
return 'released'
