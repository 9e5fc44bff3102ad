-- progress: records how far an active job has got, for status() and listeners.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] id, ARGV[4] lease token, ARGV[5] progress (0 to 100)
-- Returns: 1, or 0 when the lease is lost
local id, token = ARGV[3], ARGV[4]
local job = load(id)
if not owned(job, token) then
  return 0
end
if job.corrupt then
  return 0
end
job.progress = tonumber(ARGV[5])
save(job)
emit('progress', id, ARGV[5])
return 1
