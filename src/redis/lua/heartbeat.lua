-- heartbeat: renews the leases a worker holds, registers the worker as live, forgets
-- workers that went silent, and does the queue's due maintenance, so a dead worker's
-- jobs come back within about one lease even while every live worker is busy.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] worker id, ARGV[4] lease ms, ARGV[5] ms of silence after which a worker is
-- forgotten, then pairs of (job id, lease token)
-- Returns: {ids whose lease is lost, ids whose cancellation was requested,
--           ms until the queue next needs a look or -1}
local lease_ms = tonumber(ARGV[4])
local forget_ms = tonumber(ARGV[5])
-- Every renewed lease runs out at the same time: its text is made once.
local deadline = NOW + lease_ms
local deadline_s
redis.call('ZADD', K_WORKERS, NOW_S, ARGV[3])
local lost, cancel = {}, {}
for i = 6, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local job = load(id)
  if owned(job, token) then
    if not deadline_s then
      -- A worker with a shorter lease than the last claim's may bring the next look
      -- forward.
      note_due(deadline)
      deadline_s = int(deadline)
    end
    redis.call('ZADD', K_ACTIVE, 'XX', deadline_s, id)
    if job.cancel then
      table.insert(cancel, id)
    end
  else
    table.insert(lost, id)
  end
end
-- Bounded memory: a worker that stopped without unregistering (killed) is forgotten,
-- with its breaker, once it has been silent for forget_ms.
local stale = redis.call('ZRANGEBYSCORE', K_WORKERS, '-inf', int(NOW - forget_ms), 'LIMIT', '0', '100')
for _, worker in ipairs(stale) do
  redis.call('ZREM', K_WORKERS, worker)
  redis.call('HDEL', K_BREAKERS, worker)
end
-- Own leases first (above), then everyone else's: due jobs and expired leases.
maintain()
return { lost, cancel, next_wake() }
