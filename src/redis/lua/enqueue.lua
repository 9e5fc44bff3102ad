-- enqueue: adds one or more jobs atomically (bulk enqueue is one call, one round trip),
-- with in-flight deduplication and an optional rate limit checked in the same step.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] rate-limit key ('' for none), ARGV[4] jobs allowed per period, ARGV[5] period ms
-- ARGV[6] number of jobs n
-- ARGV[7] '1' when every record of the call is plain: the client's own object (pri
--         first when it is not normal, no `ttl_ms`, `delay_ms` or `run_at`, and none of
--         the fields the script sets), stored as it came with the script's fields
--         appended; '' to decode and rebuild each record
-- then per job four arguments (the record and payload are stored as one entry: the
-- record, a newline, the payload):
--   id, record JSON (pri, max_attempts, ttl_ms, ... set by the client),
--   payload, dedup key ('' for none: the sha256 of the request's canonical form, hex)
-- Returns: {'ok', id, created (1) or existing (0), state, ... (three per job)}
--      or  {'limited', ms until the batch would be allowed} (nothing was stored)
--          (flat: each table in a reply costs Redis a dozen lookups and a reply node)
local n = tonumber(ARGV[6])
local plain = ARGV[7] == '1'
local out = { 'ok' }
-- The answer for the i-th job (from 0): three entries of the flat reply.
local function answer(i, id, created, state)
  out[3 * i + 2], out[3 * i + 3], out[3 * i + 4] = id, created, state
end
local fresh = {}
-- Counters are added up and written once for the whole batch, events in shared entries.
start_batch()

-- Pass 1: which jobs exist already (same caller id, or same request in flight or
-- completed within its dedup TTL). Those are answered, not created.
for i = 0, n - 1 do
  local base = 8 + i * 4
  local id, dedup = ARGV[base], ARGV[base + 3]
  local existing = load(id)
  if existing then
    -- A caller-chosen id names one job: a second enqueue returns it, never overwrites it.
    count('deduplicated')
    answer(i, id, 0, existing.state)
  else
    local owner = dedup ~= '' and redis.call('HGET', K_DEDUP, dedup)
    local job = owner and load(owner)
    local reusable = job and (IN_FLIGHT[job.state] or (job.state == 'completed' and job.result
      and NOW < (tonumber(job.finished_at) or 0) + (job.dedup_ttl_ms or 0)))
    if reusable then
      count('deduplicated')
      answer(i, owner, 0, job.state)
    else
      table.insert(fresh, i)
    end
  end
end

-- Rate limit (GCRA): each new job costs period / limit of "arrival time"; a burst of up
-- to `limit` jobs is allowed. Duplicates cost nothing: they create no work.
local limit_key = ARGV[3]
if limit_key ~= '' and #fresh > 0 then
  local limit, period = tonumber(ARGV[4]), tonumber(ARGV[5])
  local interval = period / limit
  local tat = math.max(tonumber(redis.call('HGET', K_LIMITS, limit_key) or 0), NOW)
  local new_tat = tat + interval * #fresh
  if new_tat - NOW > period then
    count('rate_limited')
    end_batch()
    return { 'limited', int(math.ceil(new_tat - NOW - period)) }
  end
  -- Rounded (an interval may be a fraction of a millisecond), as it always was.
  local tat_s = string.format('%.0f', new_tat)
  redis.call('HSET', K_LIMITS, limit_key, tat_s)
  redis.call('ZADD', K_LIMITS_EXP, tat_s, limit_key)
end

-- Pass 2: create the new jobs. Two identical requests in one batch make one job.
-- Entries and each lane's ready ids are written with one HSET / RPUSH per batch
-- (in slices, so no call gets more arguments than Lua can unpack).
-- (Only a batch can hold twins: a one-job call makes no tables for them, since each
-- table a call makes is garbage Lua's collector walks the library again for.)
local created_here = n > 1 and {} or nil
local created_ids = n > 1 and {} or nil
local kept = false
-- (BATCH, BATCH_LANES, BATCH_N: the library's reusable tables, see common.lua;
-- nr: entries used)
local nr = 0
for _, i in ipairs(fresh) do
  local base = 8 + i * 4
  local id, dedup = ARGV[base], ARGV[base + 3]
  -- Within one batch, a repeated request or a repeated caller id is one job too.
  local twin = created_ids and ((dedup ~= '' and created_here[dedup]) or created_ids[id])
  if twin then
    count('deduplicated')
    answer(i, twin[1], 0, twin[2])
  else
    local raw, state = ARGV[base + 1], 'queued'
    if plain then
      -- The record is stored as the client wrote it, with the script's fields added
      -- as text: no cjson pass over it (a decode and an encode were a sixth of an
      -- enqueue's instructions, more for records with numbers, which cjson formats
      -- with a printf each).
      local lane = lane_of(tonumber(string.match(raw, '^{"pri":(%d+)')) or 1)
      local m = BATCH_N[lane] + 1
      BATCH_LANES[lane][m] = id
      BATCH_N[lane] = m
      local added = '"state":"queued","created_at":"' .. NOW_S .. '"'
      if dedup ~= '' then
        added = added .. ',"dedup":"' .. dedup .. '"'
      end
      if raw == '{}' then
        raw = '{' .. added .. '}'
      else
        raw = string.sub(raw, 1, -2) .. ',' .. added .. '}'
      end
    else
      local job = cjson.decode(raw)
      -- A time-to-live counts from now on Redis's clock, not from the caller's.
      if job.ttl_ms then
        job.expires_at = NOW + job.ttl_ms
        job.ttl_ms = nil
      end
      if job.delay_ms and job.delay_ms > 0 then
        job.run_at = NOW + job.delay_ms
      end
      job.delay_ms = nil
      job.created_at = NOW_S
      if job.run_at and job.run_at > NOW then
        job.state = 'scheduled'
        note_due(job.run_at)
        redis.call('ZADD', K_SCHEDULED, int(job.run_at), id)
      else
        -- push_ready, its RPUSH joining the batch's.
        job.state = 'queued'
        local lane = lane_of(job.pri)
        local m = BATCH_N[lane] + 1
        BATCH_LANES[lane][m] = id
        BATCH_N[lane] = m
      end
      if dedup ~= '' then
        job.dedup = dedup
      end
      state = job.state
      raw = encode(job)
    end
    if dedup ~= '' then
      if kept then
        redis.call('HSET', K_DEDUP, dedup, id)
      else
        -- Once per call: keeps the hash a hash table (see HASH_KEEPER).
        redis.call('HSET', K_DEDUP, dedup, id, HASH_KEEPER, HASH_KEEPER_TEXT)
        kept = true
      end
      redis.call('ZREM', K_DEDUP_EXP, dedup)
      if created_here then
        created_here[dedup] = { id, state }
      end
    end
    BATCH[nr + 1] = id
    BATCH[nr + 2] = raw .. '\n' .. ARGV[base + 2]
    nr = nr + 2
    count('enqueued')
    emit_step(state, id)
    if created_ids then
      created_ids[id] = { id, state }
    end
    answer(i, id, 1, state)
    if nr >= 400 then
      nr = write_batch(nr)
    end
  end
end
write_batch(nr)
end_batch()
-- Delayed jobs wake a worker too, so it recomputes how long to sleep.
-- No sweeping here: claims and heartbeats sweep when a retention comes due.
wake(#fresh)
return out
