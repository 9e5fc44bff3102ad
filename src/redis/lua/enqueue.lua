-- enqueue: adds one or more jobs atomically (bulk enqueue is one call, one round trip).
-- KEYS: the queue's 14 keys (see common.lua)
-- ARGV[1] now ms, ARGV[2] events max
-- ARGV[3] number of jobs n, then per job three arguments:
--   id, record JSON (pri, max_attempts, run_at, expires_at, ... set by the client), payload
-- Returns: per job {id, created (1) or already existing (0), state}
local n = tonumber(ARGV[3])
local out = {}
local woken = 0
for i = 0, n - 1 do
  local id = ARGV[4 + i * 3]
  local existing = load(id)
  if existing then
    -- A caller-chosen id names one job: a second enqueue returns it, never overwrites it.
    table.insert(out, { id, 0, existing.state })
  else
    local job = cjson.decode(ARGV[5 + i * 3])
    job.id = id
    job.created_at = NOW
    job.attempts = 0
    redis.call('HSET', K_PAYLOADS, id, ARGV[6 + i * 3])
    if job.run_at and job.run_at > NOW then
      job.state = 'scheduled'
      redis.call('ZADD', K_SCHEDULED, int(job.run_at), id)
    else
      push_ready(job, true)
    end
    save(job)
    count('enqueued')
    emit(job.state, id)
    woken = woken + 1
    table.insert(out, { id, 1, job.state })
  end
end
-- Delayed jobs wake a worker too, so it recomputes how long to sleep.
wake(woken)
sweep(10)
return out
