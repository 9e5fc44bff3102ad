-- heartbeat: renews the leases a worker holds and registers the worker as live.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] now ms, ARGV[2] events max
-- ARGV[3] worker id, ARGV[4] lease ms, then pairs of (job id, lease token)
-- Returns: {ids whose lease is lost, ids whose cancellation was requested}
local lease_ms = tonumber(ARGV[4])
redis.call('ZADD', K_WORKERS, int(NOW), ARGV[3])
local lost, cancel = {}, {}
for i = 5, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if owned(id, token) then
    redis.call('ZADD', K_ACTIVE, 'XX', int(NOW + lease_ms), id)
    local job = load(id)
    if job and job.cancel then
      table.insert(cancel, id)
    end
  else
    table.insert(lost, id)
  end
end
return { lost, cancel }
