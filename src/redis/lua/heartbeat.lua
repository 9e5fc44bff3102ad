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
-- The renewals, one ZADD for up to HELD_MAX arguments: a worker whose slots hold
-- jobs ahead renews hundreds at a time.
local renewed, nr = {}, 0
for i = 6, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', K_JOBS, id)
  -- The record as the claim wrote it, by plain search (no decode: this runs for every
  -- job a worker holds, every beat); anything else the general way.
  local record_end = raw and leased_text(raw, token)
  local mine, cancelled
  if record_end then
    mine, cancelled = true, cancel_text(raw, record_end)
  else
    local job = raw and decode_entry(id, raw)
    mine = owned(job, token)
    cancelled = mine and job.cancel
  end
  if mine then
    if not deadline_s then
      -- A worker with a shorter lease than the last claim's may bring the next look
      -- forward.
      note_due(deadline)
      deadline_s = int(deadline)
    end
    renewed[nr + 1], renewed[nr + 2] = deadline_s, id
    nr = nr + 2
    if nr >= HELD_MAX then
      redis.call('ZADD', K_ACTIVE, 'XX', unpack(renewed, 1, nr))
      nr = 0
    end
    if cancelled then
      table.insert(cancel, id)
    end
  else
    table.insert(lost, id)
  end
end
if nr > 0 then
  redis.call('ZADD', K_ACTIVE, 'XX', unpack(renewed, 1, nr))
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
