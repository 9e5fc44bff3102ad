-- purge: deletes dead jobs for good: their dead-letter entry, record, payload and result.
-- KEYS: the queue's 14 keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] mode:
--   'ids'    ARGV[4..] job ids; ids not in the dead letters are skipped, so a live job
--            is never deleted by mistake
--   'before' ARGV[4] age in ms: jobs dead for longer than this ('' for all),
--            ARGV[5] at most this many per call (the client loops until fewer come
--            back). The age counts on Redis's clock, which stamped the deaths.
-- Returns: how many jobs were purged
local function purge(id)
  erase(id)
  count('purged')
  emit('purged', id)
end

local purged = 0
if ARGV[3] == 'ids' then
  for i = 4, #ARGV do
    if redis.call('ZSCORE', K_DEAD, ARGV[i]) then
      purge(ARGV[i])
      purged = purged + 1
    end
  end
elseif ARGV[3] == 'before' then
  local max = '+inf'
  if ARGV[4] ~= '' then
    max = '(' .. int(NOW - tonumber(ARGV[4]))
  end
  local ids = redis.call('ZRANGEBYSCORE', K_DEAD, '-inf', max, 'LIMIT', 0, tonumber(ARGV[5]))
  for _, id in ipairs(ids) do
    purge(id)
  end
  purged = #ids
else
  return redis.error_reply('purge: unknown mode ' .. tostring(ARGV[3]))
end
return purged
