-- cancel: a waiting job is cancelled at once; an active one is flagged, its worker
-- sees the flag on its next heartbeat and cancels the handler's token.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max, ARGV[3] id
-- Returns: 'cancelled', 'requested' (active), 'missing', or 'was:<state>' for a job
-- that had already finished
local id = ARGV[3]
local job = load(id)
if not job then
  return 'missing'
end
if job.state == 'queued' then
  -- O(position in the lane): cancelling a waiting job is rare; a list entry costs a
  -- tenth of a sorted-set member on every job.
  if redis.call('LREM', LANES[lane_of(job.pri)], 1, id) == 0 then
    redis.call('ZREM', K_READY, id)
  end
  finish(job, 'cancelled')
  return 'cancelled'
elseif job.state == 'scheduled' then
  redis.call('ZREM', K_SCHEDULED, id)
  finish(job, 'cancelled')
  return 'cancelled'
elseif job.state == 'active' then
  if not job.cancel then
    job.cancel = true
    save(job)
    emit('cancelling', id)
  end
  return 'requested'
end
return 'was:' .. job.state
