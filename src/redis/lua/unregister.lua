-- unregister: a worker that stops removes itself from the live set.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max, ARGV[3] worker id
-- Returns: 1 when the worker was registered
redis.call('HDEL', K_BREAKERS, ARGV[3])
return redis.call('ZREM', K_WORKERS, ARGV[3])
