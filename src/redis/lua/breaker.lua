-- breaker: records a worker's circuit-breaker transition for stats and listeners.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] worker id, ARGV[4] state ('open', 'half_open' or 'closed')
-- Returns: 1
if ARGV[4] == 'closed' then
  redis.call('HDEL', K_BREAKERS, ARGV[3])
else
  redis.call('HSET', K_BREAKERS, ARGV[3], ARGV[4])
end
count('breaker_' .. ARGV[4])
emit('breaker', ARGV[3], ARGV[4])
return 1
