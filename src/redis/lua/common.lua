-- Shared prelude of every transition script: the library they are functions of.
--
-- Every script receives the same KEYS, all under one hash tag, so every call touches
-- one slot and no key is ever built inside a script (managed clusters and Dragonfly
-- refuse undeclared keys). Enqueue receives the first twelve alone, all it uses (the
-- others are nil in its calls):
--   KEYS[1]  jobs       hash   id -> job record (JSON), a newline, the payload bytes
--                               (never decoded here); one entry per job, not two
--   KEYS[2]  ready:high   list ready ids of high priority, oldest first
--   KEYS[3]  ready:normal list ready ids of normal priority
--   KEYS[4]  ready:low    list ready ids of low priority
--   (Lists, not one sorted set: a list entry costs a tenth of a sorted-set member,
--   and FIFO within a priority is all the order a queue needs. A job that comes back
--   from a dead worker or a shutdown goes to the head of its lane: it keeps its place.)
--   KEYS[5]  scheduled  zset   score = run-at ms
--   KEYS[6]  events     stream capped job events
--   KEYS[7]  wake       list   one token per enqueue, for blocked workers
--   KEYS[8]  stats      hash   monotonic counters, and `dead_cap` (see trim_dead)
--   KEYS[9]  dedup      hash   sha256 of a request -> id of the job that owns it
--   KEYS[10] dedup_exp  zset   sha256 -> ms after which the entry may be swept
--   KEYS[11] limits     hash   rate-limit key -> theoretical arrival time (GCRA) ms
--   KEYS[12] limits_exp zset   rate-limit key -> ms after which the entry is idle
--   KEYS[13] payloads   hash   id -> payload bytes of records written before the
--                               payload moved into the record; read and dropped only
--   KEYS[14] results    hash   id -> result bytes
--   KEYS[15] leases     hash   id -> lease token, only for jobs claimed before the token
--                               moved into the record (`lease`); read and dropped, never written
--   KEYS[16] ready      zset   ready jobs from before the lanes (KEYS[2..4]);
--                               score = priority rank * 1e13 + sequence; drained only
--   KEYS[17] active     zset   score = lease deadline ms
--   KEYS[18] dead       zset   score = time of death ms
--   KEYS[19] finished   zset   score = ms at which the finished record is swept
--   KEYS[20] workers    zset   worker id -> last heartbeat ms
--   KEYS[21] seq        string sequence for FIFO order and lease tokens
--   KEYS[22] breakers   hash   worker id -> circuit-breaker state, while not closed
-- ARGV[1] '' to run on Redis's clock (`TIME`), the only clock of the queue; a test
--          harness may pass a fixed time in ms instead (the client never does)
-- ARGV[2] maximum length of the events stream; negative: the same, without the
--         events of ordinary steps (see STEP_EVENTS)
-- ARGV[3..] script specific (see each script's header)

-- The prelude is written as a library: it defines functions and constants only, and
-- `begin` binds one call's keys, clock and stream cap. Redis runs it once per FUNCTION
-- LOAD (each transition is then a function of the library, called by FCALL), or at
-- the top of every call where a server only takes EVALSHA, with `begin(KEYS, ARGV)`
-- prepended to the script's own lines (see scripts.rs). No per-call work happens at
-- the top level, and every value a call sets is set again by the next call's `begin`.

-- Integers as text a script builds itself (concatenation and tostring() use %.14g,
-- which writes large numbers as 1e+14), and values that must not be rounded (tokens,
-- rate-limit times). Every number that becomes text costs a printf, in Lua or in
-- Redis (a number passed to redis.call is written with %.17g in 7.0): on the per-job
-- path the scripts pass text made once per call instead (NOW_S, a claim's deadline),
-- which took a sixth of Redis's instructions per job. Only integers come here (times,
-- tokens, counts): '%d' formats them exactly (Lua's integer format is 64 bits wide) at
-- half the cost of '%.0f', which goes through the floating-point printf.
local function int(n)
  return string.format('%d', n)
end

-- Small counts as text (how many to pop, to reserve, to add), each made once per
-- library load rather than once per use (a number passed to redis.call costs Redis a
-- %.17g printf). Bounded: larger counts are formatted each time.
local SMALL = {}
local function small(n)
  local s = SMALL[n]
  if not s then
    s = int(n)
    if n >= 0 and n <= 1024 then
      SMALL[n] = s
    end
  end
  return s
end

local K_JOBS, K_PAYLOADS, K_RESULTS, K_LEASES
local K_READY, K_SCHEDULED, K_ACTIVE, K_DEAD
local K_FINISHED, K_EVENTS, K_WAKE, K_WORKERS
local K_SEQ, K_STATS
local K_DEDUP, K_DEDUP_EXP, K_LIMITS, K_LIMITS_EXP
local K_BREAKERS
local LANES = {}
local NOW, NOW_S, STEP_EVENTS
-- The stream cap as text, as XADD takes it.
local EVENTS_MAX_S
-- The earliest time maintenance may be due (see `maintain`), as read in this call
-- (nil: not read yet), and the retention deadline of a finished job with the default
-- result TTL, made once per call.
local due_at, finished_default
-- Counters a batch script adds up in Lua and writes once at its end (see
-- `end_batch`), instead of one HINCRBY per job; nil: written at once.
local deferred = nil
-- Events a batch script holds back to write as one stream entry: consecutive events
-- of one kind with the same detail (`ev_kind`, `ev_data`) share an entry, their job
-- ids joined by newlines (an id has no control characters). A no-op job's XADDs were
-- a tenth of its instructions. Only consecutive ones merge, so the stream keeps the
-- order in which things happened. `ev_ids` is made once (see BATCH below); `ev_n`
-- says how much of it is this call's; nil `ev_n`: each event is written at once.
local EV_IDS_MAX = 64
local ev_ids = {}
local ev_n, ev_kind, ev_data = nil, nil, nil
-- The hot path's held writes, one argument list per kind (see `hold`), and how many
-- arguments they hold in all (0: nothing to flush or reset, the common case).
local HELD = {}
for i = 1, 5 do
  HELD[i] = { n = 0 }
end
local held_n = 0

local function begin(keys, args)
  K_JOBS, LANES[1], LANES[2], LANES[3] = keys[1], keys[2], keys[3], keys[4]
  K_SCHEDULED, K_EVENTS, K_WAKE, K_STATS = keys[5], keys[6], keys[7], keys[8]
  K_DEDUP, K_DEDUP_EXP, K_LIMITS, K_LIMITS_EXP = keys[9], keys[10], keys[11], keys[12]
  K_PAYLOADS, K_RESULTS, K_LEASES, K_READY = keys[13], keys[14], keys[15], keys[16]
  K_ACTIVE, K_DEAD, K_FINISHED = keys[17], keys[18], keys[19]
  K_WORKERS, K_SEQ, K_BREAKERS = keys[20], keys[21], keys[22]
  -- One clock: Redis's. A caller's clock may run ahead or behind, and a call may wait
  -- behind a stalled server; the time the script runs is when the transition happens
  -- (a lease starts when Redis hands the job over).
  if args[1] ~= nil and args[1] ~= '' then
    NOW = tonumber(args[1])
    NOW_S = int(NOW)
  else
    -- Milliseconds as text with no number formatted: the seconds, then the first
    -- three of the six microsecond digits.
    local t = redis.call('TIME')
    NOW_S = t[1] .. string.sub('00000' .. t[2], -6, -4)
    NOW = tonumber(NOW_S)
  end
  due_at, finished_default = nil, nil
  -- A negative cap says the queue keeps only the events that matter to waiters and
  -- operators (outcomes, retries, stalls, ...), not the steps of every job's life
  -- (queued, scheduled, active): two stream writes fewer per job on the hot path.
  STEP_EVENTS = tonumber(args[2]) > 0
  -- The cap's own text, without the sign that says step events are off.
  EVENTS_MAX_S = string.byte(args[2], 1) == 45 and string.sub(args[2], 2) or args[2]
  -- A library's state outlives a call: a call that failed half-way left nothing here.
  deferred = nil
  ev_n = nil
  if held_n > 0 then
    for i = 1, 5 do
      HELD[i].n = 0
    end
    held_n = 0
  end
end

local WAKE_MAX = 1000           -- more tokens than this wake nobody new
local ERRORS_MAX = 10           -- attempt errors kept per job (the latest)
local DEAD_CAP_DEFAULT = 10000  -- dead letters kept when the queue sets no cap

-- A record that does not decode must not fail every script that meets it (that would
-- stop the whole queue): it comes back as a stub marked `corrupt`, keeping the raw
-- bytes, and the transitions that meet it bury it with the reason.
local STATES = {
  queued = true, scheduled = true, active = true,
  completed = true, dead = true, cancelled = true, expired = true,
}
-- The type every field a script does arithmetic on, indexes by or stores must have.
-- The times a transition stamps (`created_at`, `started_at`, `finished_at`) are
-- written as text, NOW_S, which cjson copies where a number costs it a printf (a
-- tenth of a job's instructions went to formatting numbers); records written before
-- hold numbers. Scripts read them only through tonumber.
local FIELD_TYPES = {
  pri = 'number', seq = 'number', attempts = 'number', max_attempts = 'number',
  timeout_ms = 'number', created_at = 'time', run_at = 'number',
  expires_at = 'number', started_at = 'time', finished_at = 'time',
  result_ttl_ms = 'number', dedup_ttl_ms = 'number', progress = 'number',
  worker = 'string', reason = 'string', dedup = 'string', lease = 'string',
  errors = 'table',
}
local TYPE_NAMES = {
  number = 'a number', string = 'a string', table = 'a list', time = 'a time',
}

-- Why a decoded record cannot be used (nil when it can): every field a script does
-- arithmetic on, indexes by or stores must have its type, checked before any script
-- moves the job, so a wrong-shaped record is buried instead of failing a script
-- half-way (which would leave the job in no index at all). One pass over the fields
-- the record has (a handful), not over every field it might have.
local function shape_error(id, job)
  -- The id is the hash field; a record does not repeat it (it did before), but one
  -- that names another job is not this job's.
  if job.id ~= nil and job.id ~= id then
    return 'id is ' .. type(job.id) .. ' ' .. tostring(job.id) .. ', not the job id'
  end
  if not STATES[job.state] then
    return 'unknown state ' .. tostring(job.state)
  end
  for field, v in pairs(job) do
    local want = FIELD_TYPES[field]
    local got = type(v)
    if want and got ~= want and not (want == 'time' and (got == 'number' or got == 'string')) then
      return field .. ' is a ' .. got .. ', not ' .. TYPE_NAMES[want]
    end
  end
  return nil
end

-- A job's entry, `raw` as stored under `id`, decoded. The entry holds the record (cjson
-- never writes a raw newline), a newline, and the payload: one hash entry per job. The
-- payload rides along as `job.body`, never decoded; an entry without the newline was
-- written before the payload moved in, and its payload is in the payloads hash (`body`
-- stays nil, and the entry keeps its old form when saved).
local function decode_entry(id, raw)
  local body
  local nl = string.find(raw, '\n', 1, true)
  if nl then
    body = string.sub(raw, nl + 1)
    raw = string.sub(raw, 1, nl - 1)
  end
  local ok, job = pcall(cjson.decode, raw)
  if not ok or type(job) ~= 'table' then
    return { id = id, state = 'corrupt', corrupt = tostring(job), raw = raw, body = body }
  end
  local wrong = shape_error(id, job)
  if wrong then
    return { id = id, state = 'corrupt', corrupt = 'wrong shape: ' .. wrong, raw = raw, body = body }
  end
  job.id = id
  job.body = body
  return job
end

-- The job stored under `id` (see `decode_entry`), or nil when there is none.
local function load(id)
  local raw = redis.call('HGET', K_JOBS, id)
  if not raw then
    return nil
  end
  return decode_entry(id, raw)
end

-- A record as stored: without its id (the hash field holds it) — memory per job —
-- and without the payload.
local function encode(job)
  local id, body = job.id, job.body
  job.id, job.body = nil, nil
  local raw = cjson.encode(job)
  job.id, job.body = id, body
  return raw
end

-- The entry of a job whose record is `raw` (its encoded form).
local function entry(job, raw)
  if job.body then
    return raw .. '\n' .. job.body
  end
  return raw
end

local function save(job)
  redis.call('HSET', K_JOBS, job.id, entry(job, encode(job)))
end

-- The payload of a loaded job (an old entry's from the payloads hash).
local function payload_of(job)
  return job.body or redis.call('HGET', K_PAYLOADS, job.id) or ''
end

-- Redis keeps a hash of up to 512 short fields (`hash-max-listpack-entries`) as one
-- packed list, where each read or write walks the fields before it: the first 512
-- results of a queue cost a completion some 30 k instructions each, a dedup lookup
-- walks every request key in retention, and every counter update walks the stats
-- hash's seventy fields. A value longer than 64 bytes makes a hash a hash table for
-- good (Redis 7 never packs it again), as ACTIVE_KEEPER does for `active`: the stats
-- hash gets this field from maintenance (with `due`), results from each completion
-- batch, and dedup from each enqueue that writes a request key. The name holds a
-- newline, which no job id (the results' fields) or request key (dedup's) can, and
-- readers skip it (`stats()` counts numbers only); it stays when the rest is swept.
local HASH_KEEPER = '\nkeeper'
local HASH_KEEPER_TEXT = 'voxqueue: not an entry. This field keeps the hash a hash table, '
  .. 'so that reading or writing a field costs O(1), not a walk of every field (see common.lua)'

-- Writes of the hot path (a claim's leases and records; a completion's result, lease
-- drop, retention and record) held back so that each kind goes to Redis as one call
-- for the whole batch: a call from Lua costs Redis far more than one more argument to
-- a call it makes anyway (3 % of a no-op job's instructions at concurrency 50).
-- Only the two success paths hold, and only for jobs no other step of the same call
-- reads before `flush_held` (claim and report see to it: a job is claimed or reported
-- once per call, and they flush before anything else looks). Made once, like BATCH.
local HELD_MAX = 1000         -- arguments per held call (Lua's C stack takes ~8000)
local H_JOBS, H_RESULTS, H_UNACTIVE, H_ACTIVE, H_FINISHED = 1, 2, 3, 4, 5
local HELD_CMD = { 'HSET', 'HSET', 'ZREM', 'ZADD', 'ZADD' }

local function flush_one(i)
  local h = HELD[i]
  local n = h.n
  if n > 0 then
    if i == H_RESULTS then
      redis.call('HSET', K_RESULTS, HASH_KEEPER, HASH_KEEPER_TEXT, unpack(h, 1, n))
    else
      local key = (i == H_JOBS and K_JOBS) or (i == H_FINISHED and K_FINISHED) or K_ACTIVE
      redis.call(HELD_CMD[i], key, unpack(h, 1, n))
    end
    for j = 1, n do
      h[j] = nil
    end
    h.n = 0
  end
end

-- Writes every held call (a lease dropped before one is added: the order a call per
-- job had).
local function flush_held()
  if held_n > 0 then
    for i = 1, 5 do
      flush_one(i)
    end
    held_n = 0
  end
end

-- The `active` index holds one member that is not a job: this name, scored +inf (no
-- lease runs out then, so recovery never reads it). Redis keeps a sorted set of up to
-- 128 short members as one packed list, where adding or removing a member walks the
-- whole list: a sixteenth of a no-op job's instructions went to the leases of the
-- jobs around it. A member longer than 64 bytes makes it a skip list for good
-- (O(log n) a step; Redis 7 never packs it again), at the cost of one entry per queue.
-- The name is longer than twice the default limit, so a server configured with a
-- larger one still converts. Readers of `active` skip it: it scores +inf (a job id
-- would have to be this very text to collide with it), and `first_score` treats +inf
-- as nothing.
local ACTIVE_KEEPER = 'voxqueue: not a job. This member keeps the active index a skip '
  .. 'list, so that adding or dropping a lease costs O(log n), not O(n) (see common.lua)'

-- Adds one or two arguments to a held call.
local function hold(i, a, b)
  local h = HELD[i]
  local n = h.n + 1
  h[n] = a
  if b ~= nil then
    n = n + 1
    h[n] = b
  end
  h.n = n
  held_n = held_n + 1
  if n >= HELD_MAX then
    flush_one(i)
  end
end

-- One stream entry: `ids` is one job id, or several joined by newlines.
local function write_event(kind, ids, data)
  if data then
    redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAX_S, '*',
      'type', kind, 'id', ids, 'at', NOW_S, 'data', data)
  else
    redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAX_S, '*',
      'type', kind, 'id', ids, 'at', NOW_S)
  end
end

-- Writes the events held back (see `ev_ids`).
local function flush_events()
  if ev_n and ev_n > 0 then
    write_event(ev_kind, table.concat(ev_ids, '\n', 1, ev_n), ev_data)
    ev_n = 0
  end
end

local function emit(kind, id, data)
  if not ev_n then
    write_event(kind, id, data)
    return
  end
  if ev_n > 0 and (kind ~= ev_kind or data ~= ev_data or ev_n >= EV_IDS_MAX) then
    flush_events()
  end
  ev_kind, ev_data = kind, data
  ev_n = ev_n + 1
  ev_ids[ev_n] = id
end

-- The events of a job's ordinary steps, which a queue may turn off.
local function emit_step(kind, id, data)
  if STEP_EVENTS then
    emit(kind, id, data)
  end
end

local function count(field, n)
  if deferred then
    deferred[field] = (deferred[field] or 0) + (n or 1)
    return
  end
  redis.call('HINCRBY', K_STATS, field, small(n or 1))
end

-- Per-minute outcome counts in a ring of 60 fields of the stats hash ("w:<slot>" =
-- "minute,completed,failed,duration ms"), for the recent error rate and mean duration
-- without a key per minute.
local function window(completed, failed, duration_ms)
  if deferred then
    deferred['w:c'] = (deferred['w:c'] or 0) + completed
    deferred['w:f'] = (deferred['w:f'] or 0) + failed
    deferred['w:d'] = (deferred['w:d'] or 0) + math.max(duration_ms, 0)
    return
  end
  local minute = math.floor(NOW / 60000)
  local field = 'w:' .. int(minute % 60)
  local c, f, d = 0, 0, 0
  local raw = redis.call('HGET', K_STATS, field)
  if raw then
    local pm, pc, pf, pd = string.match(raw, '^(%d+),(%d+),(%d+),(%d+)$')
    if tonumber(pm) == minute then
      c, f, d = tonumber(pc), tonumber(pf), tonumber(pd)
    end
  end
  redis.call('HSET', K_STATS, field,
    int(minute) .. ',' .. int(c + completed) .. ',' .. int(f + failed) .. ',' .. int(d + math.max(duration_ms, 0)))
end

-- Starts a batch: counters are added up (see `deferred`) and events held back (see
-- `ev_ids`) until `end_batch`, which the script must call before it returns.
local function start_batch()
  deferred = {}
  ev_n = 0
end

-- Writes what a batch held back: its events, one HINCRBY per counter, one window
-- update.
local function end_batch()
  flush_held()
  flush_events()
  ev_n = nil
  local pending = deferred
  deferred = nil
  if not pending then
    return
  end
  local c, f, d = pending['w:c'], pending['w:f'], pending['w:d']
  pending['w:c'], pending['w:f'], pending['w:d'] = nil, nil, nil
  for field, n in pairs(pending) do
    count(field, n)
  end
  if c or f then
    window(c or 0, f or 0, d or 0)
  end
end

-- One token per new piece of work, in one call; claims trim the list back to the
-- work that is left (see `claim`), so tokens never pile up behind busy workers.
-- One call on the hot path: push, then trim only when the list grew past the cap.
local function wake(n)
  if n <= 0 then
    return
  end
  local pushed
  if n == 1 then
    -- The common case, without a table (each one a call makes is garbage).
    pushed = redis.call('RPUSH', K_WAKE, '1')
  else
    local tokens = {}
    for i = 1, math.min(n, WAKE_MAX) do
      tokens[i] = '1'
    end
    pushed = redis.call('RPUSH', K_WAKE, unpack(tokens))
  end
  if pushed > WAKE_MAX then
    redis.call('LTRIM', K_WAKE, 0, WAKE_MAX - 1)
  end
end

-- Tables a batch fills and writes with one call each (enqueue's entries, and each
-- lane's ready ids), with explicit lengths so that stale entries never count. As
-- functions of a library they are made once, not per call: a call's garbage is what
-- makes Lua's collector walk the whole library again.
local BATCH = {}
local BATCH_LANES = { {}, {}, {} }
local BATCH_N = { 0, 0, 0 }

-- The lane (1 high, 2 normal, 3 low) of a priority rank.
local function lane_of(pri)
  if pri == 0 or pri == 2 then
    return pri + 1
  end
  return 2
end

-- Writes the first nr entries of BATCH (id, entry, ...) and every lane's batched ids,
-- and lets go of them. Returns 0 (the new length of BATCH).
local function write_batch(nr)
  if nr > 0 then
    redis.call('HSET', K_JOBS, unpack(BATCH, 1, nr))
    for i = 1, nr do
      BATCH[i] = nil
    end
  end
  for l = 1, 3 do
    local n, ids = BATCH_N[l], BATCH_LANES[l]
    if n > 0 then
      redis.call('RPUSH', LANES[l], unpack(ids, 1, n))
      for i = 1, n do
        ids[i] = nil
      end
      BATCH_N[l] = 0
    end
  end
  return 0
end

-- Puts a job in its ready lane: at the tail when it is new work (enqueued, due,
-- requeued), at the head when it comes back (a dead worker's, a shutdown's), so it
-- keeps its place in line.
local function push_ready(job, back)
  job.state = 'queued'
  job.seq = nil
  local lane = LANES[lane_of(job.pri)]
  if back then
    redis.call('LPUSH', lane, job.id)
  else
    redis.call('RPUSH', lane, job.id)
  end
end

-- The lease token lives in the record (`lease`), written with the claim's one HSET of
-- the record, so a claim and a report need no call of their own for it. A record
-- without one may still hold a lease in the `leases` hash (claimed by an older
-- version): that entry is dropped too. Takes the job, or the id of a job without a
-- record.
local function release_lease(job)
  if type(job) ~= 'table' then
    redis.call('HDEL', K_LEASES, job)
    redis.call('ZREM', K_ACTIVE, job)
    return
  end
  if job.lease then
    job.lease = nil
  else
    redis.call('HDEL', K_LEASES, job.id)
  end
  redis.call('ZREM', K_ACTIVE, job.id)
end

-- Maintenance (promoting due jobs, recovering expired leases, sweeping retentions)
-- used to start with three sorted-set reads on every claim, a sixth of a one-slot
-- worker's instructions per job. The stats hash keeps `due`, a time no later than the
-- earliest score in `scheduled`, `active` and `finished` and no later than a second
-- after the last exact look: every script that adds a score lowers it (`note_due`),
-- and a claim or heartbeat looks at the sets only once it has passed. The second's
-- cap bounds what a writer that does not keep `due` (an older version, a failed-over
-- server whose clock differs) can delay.
local DUE_FIELD = 'due'
local DUE_CAP_MS = 1000
local function due()
  if not due_at then
    due_at = tonumber(redis.call('HGET', K_STATS, DUE_FIELD)) or 0
  end
  return due_at
end

-- A score `at` was added to scheduled, active or finished.
local function note_due(at)
  if at < due() then
    due_at = at
    redis.call('HSET', K_STATS, DUE_FIELD, int(at))
  end
end

-- A finished job's dedup entry: a completed job answers duplicates for its dedup
-- TTL; any other ending frees the request for a new job at once.
local function settle_dedup(job)
  if job.dedup then
    local keep = job.state == 'completed' and job.dedup_ttl_ms or 0
    redis.call('ZADD', K_DEDUP_EXP, keep == 0 and NOW_S or int(NOW + keep), job.dedup)
  end
end

-- The indexes of a job that ends in a terminal state other than dead (`job.state` set):
-- its dedup entry settles, its lease goes, and it is kept for the result TTL, then
-- swept. With `held`, the lease drop and retention wait for `flush_held`.
local function retire(job, held)
  settle_dedup(job)
  if held and job.lease then
    job.lease = nil
    hold(H_UNACTIVE, job.id)
  else
    release_lease(job)
  end
  local at
  if job.result_ttl_ms then
    at = NOW + job.result_ttl_ms
    note_due(at)
    at = int(at)
  else
    if not finished_default then
      finished_default = NOW + 86400000
      note_due(finished_default)
      finished_default = int(finished_default)
    end
    at = finished_default
  end
  if held then
    hold(H_FINISHED, at, job.id)
  else
    redis.call('ZADD', K_FINISHED, at, job.id)
  end
end

-- Terminal states other than dead (see `retire`). The payload goes: only a dead job
-- runs again (requeue), so a finished one's request would sit in memory for the whole
-- retention unread, and leaving it out spares the save a copy of it (Lua hashes every
-- byte of every string it makes). With `held`, the writes wait for `flush_held`.
local function finish(job, state, held)
  job.state = state
  job.finished_at = NOW_S
  job.cancel = nil
  job.body = nil
  retire(job, held)
  if held then
    hold(H_JOBS, job.id, entry(job, encode(job)))
  else
    save(job)
  end
  count(state)
  emit(state, job.id)
end

-- Deletes every trace of a job (record, payload, result) and its dead-letter entry.
local function erase(id)
  redis.call('ZREM', K_DEAD, id)
  redis.call('HDEL', K_JOBS, id)
  redis.call('HDEL', K_PAYLOADS, id)
  redis.call('HDEL', K_RESULTS, id)
end

-- The dead-letter cap lives in the stats hash (field `dead_cap`, written when a queue
-- built with `dead_letter_cap` connects) rather than in ARGV: every script that can
-- bury (claim through recover, fail, ...) then honours it without each caller having
-- to pass it, and a worker built without the setting still enforces the cap that an
-- operator's process set. Bounded per call; a lowered cap is reached over later burials.
local function trim_dead()
  local cap = tonumber(redis.call('HGET', K_STATS, 'dead_cap')) or DEAD_CAP_DEFAULT
  if cap <= 0 then
    return
  end
  local over = redis.call('ZCARD', K_DEAD) - cap
  if over <= 0 then
    return
  end
  local oldest = redis.call('ZRANGE', K_DEAD, '0', small(math.min(over, 100) - 1))
  for _, id in ipairs(oldest) do
    erase(id)
    count('purged')
    emit('purged', id, 'dead letter cap')
  end
end

local function bury(job, reason)
  job.state = 'dead'
  job.finished_at = NOW_S
  job.reason = reason
  job.cancel = nil
  settle_dedup(job)
  release_lease(job)
  redis.call('ZADD', K_DEAD, NOW_S, job.id)
  save(job)
  count('dead')
  emit('dead', job.id, reason)
  trim_dead()
end

local function record_error(job, kind, message)
  if type(job.errors) ~= 'table' then
    job.errors = {}
  end
  table.insert(job.errors, { attempt = job.attempts or 0, at = NOW, kind = kind, message = message })
  -- Bounded: a job retried a thousand times keeps its latest errors, not all of them.
  while #job.errors > ERRORS_MAX do
    table.remove(job.errors, 1)
  end
end

local IN_FLIGHT = { queued = true, scheduled = true, active = true }

-- The sweeps: finished records whose retention has passed, dedup entries that answer
-- no more duplicates, and idle rate-limit entries; each bounded so no call is slow
-- (what is left keeps `due` at or before now, see `maintain`).
local function sweep_finished(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', NOW_S, 'LIMIT', '0', small(limit))
  if #ids > 0 then
    redis.call('HDEL', K_JOBS, unpack(ids))
    redis.call('HDEL', K_PAYLOADS, unpack(ids))
    redis.call('HDEL', K_RESULTS, unpack(ids))
    redis.call('ZREM', K_FINISHED, unpack(ids))
  end
end

local function sweep_dedup(limit)
  local keys = redis.call('ZRANGEBYSCORE', K_DEDUP_EXP, '-inf', NOW_S, 'LIMIT', '0', small(limit))
  for _, key in ipairs(keys) do
    redis.call('ZREM', K_DEDUP_EXP, key)
    local owner = redis.call('HGET', K_DEDUP, key)
    local job = owner and load(owner)
    -- A newer job may own the key by now; only a settled owner's entry goes.
    if not (job and IN_FLIGHT[job.state]) then
      redis.call('HDEL', K_DEDUP, key)
    end
  end
end

local function sweep_limits(limit)
  local keys = redis.call('ZRANGEBYSCORE', K_LIMITS_EXP, '-inf', NOW_S, 'LIMIT', '0', small(limit))
  for _, key in ipairs(keys) do
    redis.call('ZREM', K_LIMITS_EXP, key)
    redis.call('HDEL', K_LIMITS, key)
  end
end

-- Moves due scheduled jobs (delays and retries) to ready.
local function promote(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_SCHEDULED, '-inf', NOW_S, 'LIMIT', '0', small(limit))
  for _, id in ipairs(ids) do
    redis.call('ZREM', K_SCHEDULED, id)
    local job = load(id)
    if job and job.corrupt then
      bury(job, 'corrupt job record: ' .. job.corrupt)
    elseif job then
      push_ready(job, false)
      save(job)
      emit_step('queued', id)
    end
  end
  -- A heartbeat may promote while every worker sleeps: wake as many as came due.
  wake(#ids)
end

-- Jobs whose lease passed: their worker died or lost Redis. They go back to ready
-- (keeping their place) or, with attempts spent, to the dead letters.
local function recover(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_ACTIVE, '-inf', NOW_S, 'LIMIT', '0', small(limit))
  -- Latest lease first: each goes to the head of its lane, so the one claimed first
  -- ends up first again.
  for i = #ids, 1, -1 do
    local id = ids[i]
    local job = load(id)
    if not job then
      release_lease(id)
    elseif job.corrupt then
      bury(job, 'corrupt job record: ' .. job.corrupt)
    else
      local message = 'lease expired: worker ' .. tostring(job.worker) .. ' stopped heartbeating'
      record_error(job, 'stalled', message)
      count('stalled')
      window(0, 1, 0)
      if job.cancel then
        finish(job, 'cancelled')
      elseif (job.attempts or 0) >= (job.max_attempts or 1) then
        bury(job, message)
      else
        release_lease(job)
        push_ready(job, true)
        save(job)
        emit('stalled', id, message)
        wake(1)
      end
    end
  end
end

-- The score of a zset's first member, or nil when it is empty.
local function first_score(key)
  local first = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
  if #first > 0 then
    local score = tonumber(first[2])
    -- +inf: only `active`'s keeper (see ACTIVE_KEEPER) is left.
    if score ~= math.huge then
      return score
    end
  end
  return nil
end

-- The first score of `key` (nil: none) after `pass(limit)`, run when that score is due,
-- and whether it ran. The score is read again only after a pass: what is left of a
-- bounded one keeps `due` at or before now.
local function run_due(key, pass, limit)
  local first = first_score(key)
  if first and first <= NOW then
    pass(limit)
    return first_score(key), true
  end
  return first, false
end

-- Maintenance that is due: scheduled jobs whose time came, leases that ran out, and
-- retentions that passed (finished records, dedup entries, idle rate limits). Nothing
-- is read but `due` until it passes (see `note_due`); then each check is one O(log n)
-- read, and `due` is set to the next time there is work again, a second ahead at
-- most. The retentions of dedup and rate-limit entries are not noted as they are
-- written: the look a second brings finds them, and a backlog keeps `due` at now, so
-- every call sweeps until it is gone. Returns true when jobs became ready.
local function maintain()
  local cached = due()
  if NOW < cached and cached <= NOW + DUE_CAP_MS then
    return false
  end
  -- Each set in turn (recovery may finish jobs, so the retentions come after it).
  local scheduled, promoted = run_due(K_SCHEDULED, promote, 1000)
  local active, recovered = run_due(K_ACTIVE, recover, 100)
  local finished = run_due(K_FINISHED, sweep_finished, 100)
  local dedup = run_due(K_DEDUP_EXP, sweep_dedup, 20)
  local limits = run_due(K_LIMITS_EXP, sweep_limits, 20)
  local next_at = math.min(NOW + DUE_CAP_MS, scheduled or math.huge, active or math.huge,
    finished or math.huge, dedup or math.huge, limits or math.huge)
  due_at = next_at
  redis.call('HSET', K_STATS, DUE_FIELD, int(next_at), HASH_KEEPER, HASH_KEEPER_TEXT)
  return promoted or recovered
end

-- Milliseconds until the queue next needs a look (a scheduled job comes due or a
-- lease runs out), or -1 when nothing is pending. Relative, so no caller's clock is
-- ever compared with Redis's.
local function next_wake()
  local at = first_score(K_SCHEDULED)
  local lease = first_score(K_ACTIVE)
  if lease and (not at or lease < at) then
    at = lease
  end
  if not at then
    return -1
  end
  return math.max(at - NOW, 0)
end

-- Pops ready ids from the sorted set older versions kept, up to `want` in `ids` (made
-- when not given), and returns `ids`.
local function pop_old(want, ids)
  ids = ids or {}
  local popped = redis.call('ZPOPMIN', K_READY, small(want - #ids))
  for i = 1, #popped, 2 do
    ids[#ids + 1] = popped[i]
  end
  return ids
end

-- Pops up to `want` ready ids, the highest lane first; from the sorted set of ready
-- jobs older versions kept only with `old` (when the lanes ran dry), so jobs queued
-- before an upgrade still run, at no cost to the hot path.
local function pop_ready(want, old)
  local ids = {}
  for l = 1, 3 do
    local got = redis.call('LPOP', LANES[l], small(want - #ids))
    if got then
      for _, id in ipairs(got) do
        ids[#ids + 1] = id
      end
      if #ids >= want then
        return ids
      end
    end
  end
  if old then
    pop_old(want, ids)
  end
  return ids
end

-- A claim that meets a record as enqueue stored it (the client's object, then exactly
-- the `state` and `created_at`, and maybe `dedup`, that enqueue appends: see
-- enqueue.lua) writes the active entry as text, with no cjson pass: a decode, the
-- shape check and an encode were a seventh of a no-op job's instructions. Such a
-- record was never claimed (no `attempts`, `lease`, `worker`, `started_at`), has no
-- deadline (`expires_at`: a TTL takes the general path at enqueue) and a
-- `max_attempts` only when the client set one (a positive number). Anything else, and
-- anything a plain search cannot vouch for, takes the general path: these checks only
-- ever say no to records the general path would claim the same way, and a record
-- written by someone else that looks like enqueue's is still handed to the worker,
-- which buries what it cannot read (see `fail_one`).
--
-- The claim's fields then go right after the state, which becomes `active` (see
-- `claim`): one gsub makes the new entry, payload included, as the only new string.
-- Lua hashes every byte of every string it makes, so the pieces a concatenation would
-- need (the payload alone, twice) cost more than the claim's own work. Returns true
-- when the entry can be claimed as text, and whether the client set max attempts.
local QUEUED_AT = '"state":"queued","created_at":"'
-- What every record claimed as text gets in place of its state (see `claim`).
local ACTIVE_AT = '"state":"active","attempts":1'
local function claimable_text(raw)
  local nl = string.find(raw, '\n', 1, true)
  local at = nl and string.find(raw, QUEUED_AT, 1, true)
  if not at or at > nl then
    return nil
  end
  -- Nothing after the state but enqueue's fields: the closing quote of `created_at`
  -- ends the record, or opens `dedup`, whose closing quote does.
  local q = string.find(raw, '"', at + #QUEUED_AT, true)
  if not q or string.byte(raw, nl - 1) ~= 125 then
    return nil
  end
  if q ~= nl - 2 and (string.find(raw, '","dedup":"', q, true) ~= q
      or string.find(raw, '"', q + 11, true) ~= nl - 2) then
    return nil
  end
  -- The client's part: never claimed (none of the fields a claim writes: a second
  -- one would make the record unreadable), no deadline, no max attempts of 0 (a name
  -- found anywhere in it, even in a nested object, sends the record the general way).
  local head = string.sub(raw, 1, at - 1)
  if string.find(head, '"attempts":', 1, true) or string.find(head, '"lease":', 1, true)
    or string.find(head, '"worker":', 1, true) or string.find(head, '"started_at":', 1, true)
    or string.find(head, '"expires_at":', 1, true) then
    return nil
  end
  local m = string.find(head, '"max_attempts":', 1, true)
  if m then
    local digit = string.byte(head, m + 15)
    if not digit or digit < 49 or digit > 57 then
      return nil
    end
  end
  return true, m ~= nil
end

-- A string as JSON text (a worker id, as cjson would write it when it needs escapes).
local function json_string(s)
  if string.find(s, '[%c"\\\128-\255]') then
    return cjson.encode(s)
  end
  return '"' .. s .. '"'
end

-- Claims up to n ready jobs for a worker (jobs without their own max_attempts take
-- default_attempts), after the maintenance that is due, so any live worker keeps the
-- queue healthy. Returns a flat list: ms until the next wake-up (or -1; only computed
-- when the claim came up short, since a full claim comes back at once), then id,
-- token and entry (the record, a newline, the payload) per job; appended to `out`
-- when given (a report's outcomes: one flat reply).
local function claim(worker, n, lease_ms, default_attempts, out)
  out = out or {}
  local wake_slot = #out + 1
  out[wake_slot] = -1
  local claimed = 0
  local guard = 0
  local swept = false
  -- Lease tokens come from the sequence, reserved for the whole claim in one call.
  local next_token, last_token = 1, 0
  -- Every lease of the claim runs out at the same time: its text is made once.
  local deadline
  -- Ids popped from the lanes and not yet looked at: one pop for as many as the
  -- claim still wants. Every popped id is claimed, buried or ended before the loop
  -- stops (the pop never takes more than the loop will look at: `n - claimed` and
  -- the guard both bound it).
  local popped, at = {}, 1
  -- Ids claimed by this call (see `hold`).
  local taken = {}
  -- What a record claimed as text gets after its state (see `claimable_text`), up
  -- to the lease token: with max attempts, and without (the client set them). A gsub
  -- replacement, so each `%` doubled. Made at the first such record.
  local fields_max, fields_own
  -- The next lease token; the first one also sets the claim's deadline.
  local function lease()
    if next_token > last_token then
      last_token = redis.call('INCRBY', K_SEQ, small(n - claimed))
      next_token = last_token - (n - claimed) + 1
    end
    local token = int(next_token)
    next_token = next_token + 1
    if not deadline then
      deadline = NOW + lease_ms
      note_due(deadline)
      deadline = int(deadline)
      hold(H_ACTIVE, '+inf', ACTIVE_KEEPER)
    end
    return token
  end
  -- A job claimed under `token`: `stored` is its new entry, `sent` what the worker gets
  -- (the entry, with an old one's payload joined on).
  local function hand_over(id, token, stored, sent)
    taken[id] = true
    hold(H_ACTIVE, deadline, id)
    hold(H_JOBS, id, stored)
    emit_step('active', id, worker)
    local o = #out
    out[o + 1], out[o + 2], out[o + 3] = id, token, sent
    claimed = claimed + 1
  end
  while claimed < n and guard < n + 1000 do
    if at > #popped then
      local want = math.min(n - claimed, n + 1000 - guard)
      popped, at = pop_ready(want, false), 1
      if #popped == 0 then
        if swept then
          break
        end
        -- Short: maybe a scheduled job came due or a lease ran out since the last look
        -- (which reads what this claim holds back). The lanes were just found empty:
        -- only jobs that maintenance readied, or the old sorted set, can be popped.
        flush_held()
        swept = true
        if maintain() then
          popped = pop_ready(want, true)
        else
          popped = pop_old(want)
        end
        if #popped == 0 then
          break
        end
      end
    end
    guard = guard + 1
    local id = popped[at]
    at = at + 1
    -- An id popped twice (a lane entry left behind) is read once: what the first
    -- claim wrote is held back.
    local raw = not taken[id] and redis.call('HGET', K_JOBS, id)
    local text, own_max
    if raw then
      text, own_max = claimable_text(raw)
    end
    local job = raw and not text and decode_entry(id, raw)
    if text then
      local token = lease()
      if not fields_own then
        local rest = ',"started_at":"' .. NOW_S .. '","worker":'
          .. string.gsub(json_string(worker), '%%', '%%%%') .. ',"lease":"'
        fields_own = ACTIVE_AT .. rest
        fields_max = ACTIVE_AT .. ',"max_attempts":' .. int(default_attempts) .. rest
      end
      local active = string.gsub(raw, '"state":"queued"',
        (own_max and fields_own or fields_max) .. token .. '"', 1)
      hand_over(id, token, active, active)
    elseif job and job.corrupt then
      bury(job, 'corrupt job record: ' .. job.corrupt)
    elseif taken[id] or (job and job.state ~= 'queued') then
      -- Not ready (a lane entry left behind): the job is wherever its state says.
      redis.log(redis.LOG_WARNING, 'voxqueue: skipped ' .. id .. ' in a ready lane, state '
        .. (job and tostring(job.state) or 'active'))
    elseif job then
      if job.expires_at and job.expires_at > 0 and NOW > job.expires_at then
        finish(job, 'expired')
      else
        if not job.max_attempts or job.max_attempts == 0 then
          -- Not set per job: the claiming worker's retry policy decides.
          job.max_attempts = default_attempts
        end
        job.attempts = (job.attempts or 0) + 1
        job.state = 'active'
        job.started_at = NOW_S
        job.worker = worker
        local token = lease()
        job.lease = token
        local encoded = encode(job)
        local stored = entry(job, encoded)
        hand_over(id, token, stored,
          job.body and stored or encoded .. '\n' .. payload_of(job))
      end
    end
  end
  flush_held()
  if not swept then
    maintain()
  end
  local wake_in = -1
  if claimed < n then
    -- Wake tokens stand for work nobody took yet: keep no more than the ready jobs
    -- (plus one while jobs are scheduled, so a sleeping worker still learns of an
    -- earlier due time), so idle workers never spin through empty claims after a
    -- burst. Only a short claim trims: a full one leaves work behind, which the
    -- tokens (at most WAKE_MAX) stand for, and the first claim to find the lanes dry
    -- trims them, so an idle worker wakes at most once for nothing.
    local tokens = redis.call('LLEN', K_WAKE)
    if tokens > 0 then
      local keep = redis.call('LLEN', LANES[1]) + redis.call('LLEN', LANES[2])
        + redis.call('LLEN', LANES[3]) + redis.call('ZCARD', K_READY)
      if keep < tokens and redis.call('ZCARD', K_SCHEDULED) > 0 then
        keep = keep + 1
      end
      if keep == 0 then
        redis.call('DEL', K_WAKE)
      elseif keep < tokens then
        redis.call('LTRIM', K_WAKE, '0', small(keep - 1))
      end
    end
    wake_in = next_wake()
  end
  out[wake_slot] = wake_in
  return out
end

-- The lease check of the hot paths (completion, heartbeat), by plain search instead
-- of a decode: whether the record part of the entry `raw` (up to its newline) names
-- lease `token`. A record holds one `lease` field, which the claim wrote; text in the
-- payload never counts. Returns the end of the record part (for the caller's own
-- searches in it), or nil: then the caller takes the general path (`owned` on the
-- decoded record), which also knows older records and unreadable ones.
local function leased_text(raw, token)
  local record_end = string.find(raw, '\n', 1, true) or #raw + 1
  local at = string.find(raw, '"lease":"' .. token .. '"', 1, true)
  if at and at < record_end then
    return record_end
  end
  return nil
end

-- Whether the record part of `raw` (it ends at `record_end`) holds a cancel request.
-- The first match is the record's when it has one, since the record comes first.
local function cancel_text(raw, record_end)
  local at = string.find(raw, '"cancel":true', 1, true)
  return at ~= nil and at < record_end
end

-- The lease check every transition of an active job starts with, on its loaded
-- record (nil: no record). A record claimed by an older version keeps its token in
-- the `leases` hash; one that does not decode is owned by the token its raw bytes
-- still name, if any.
local function owned(job, token)
  if not job then
    return false
  elseif job.lease then
    return job.lease == token
  elseif job.corrupt and string.find(job.raw, '"lease":"' .. token .. '"', 1, true) then
    return true
  end
  return redis.call('HGET', K_LEASES, job.id) == token
end

-- The opening every report of an active job shares (complete, fail, release): the
-- record, the lease check, then (with `cancel_ends`) a requested cancellation.
-- Returns the job when this worker still owns it, or nil and the outcome when the
-- report ends here ('lost': nothing was changed beyond dropping the lease of a job
-- that has no record; 'dead': the record was unusable and is buried; 'cancelled').
-- A job without a record, or with one that cannot be used, has no token left to
-- check: the report does at once what recovery would do when the lease ran out
-- (drop the lease; bury the job with the reason), whoever sends it.
local function reported(id, token, cancel_ends)
  local job = load(id)
  if not job then
    release_lease(id)
    return nil, 'lost'
  end
  if job.corrupt then
    bury(job, 'corrupt job record: ' .. job.corrupt)
    return nil, 'dead'
  end
  if not owned(job, token) then
    return nil, 'lost'
  end
  if cancel_ends and job.cancel then
    finish(job, 'cancelled')
    return nil, 'cancelled'
  end
  return job
end

-- A completion the worker wrote the record for: `template` is the record it claimed,
-- completed (state, result and progress set, lease gone) and without its closing
-- brace, for the script to stamp `finished_at` on Redis's clock; `extras` is
-- "started_at result_ttl_ms dedup_ttl_ms dedup key" from that record (each may be
-- empty; the key is the rest of the text). It applies only while the stored record
-- is the one claimed under `token`: it holds the lease and no cancel request (the only
-- changes another writer makes to an active record are a cancel request and progress,
-- which the completion replaces), found by plain search in the record's part of the
-- entry (`leased_text`, `cancel_text`). Then no cjson runs: a decode and an
-- encode were a seventh of a no-op job's instructions. Anything else (an older
-- record, a lost lease, a cancel request, a vanished or unreadable record) returns
-- nil, and the report takes the general path. Returns 'completed' or nil.
local function complete_claimed(id, token, result, template, extras)
  if template == '' then
    return nil
  end
  local started, ttl, dedup_ttl, dedup = string.match(extras, '^(%d*) (%d*) (%d*) (.*)$')
  if not started then
    return nil
  end
  local raw = redis.call('HGET', K_JOBS, id)
  local record_end = raw and leased_text(raw, token)
  if not record_end or cancel_text(raw, record_end) then
    return nil
  end
  window(1, 0, NOW - (tonumber(started) or NOW))
  hold(H_RESULTS, id, result)
  local job = {
    id = id, state = 'completed', lease = token,
    result_ttl_ms = tonumber(ttl), dedup_ttl_ms = tonumber(dedup_ttl),
    dedup = dedup ~= '' and dedup or nil,
  }
  retire(job, true)
  hold(H_JOBS, id, template .. ',"finished_at":"' .. NOW_S .. '"}')
  count('completed')
  emit('completed', id)
  return 'completed'
end

-- An attempt succeeded: store the result. Returns 'completed', 'cancelled', 'dead'
-- or 'lost'.
local function complete_one(id, token, result, template, extras)
  local done = complete_claimed(id, token, result, template, extras)
  if done then
    return done
  end
  local job, outcome = reported(id, token, true)
  if not job then
    return outcome
  end
  window(1, 0, NOW - (tonumber(job.started_at) or NOW))
  hold(H_RESULTS, id, result)
  job.result = true
  job.progress = 100
  finish(job, 'completed', true)
  return 'completed'
end

-- An attempt failed: record the error, then retry in `retry_in` ms (a number as
-- text) or, with '', bury the job. The client's RetryPolicy chose which. Returns
-- 'retrying', 'dead', 'cancelled' or 'lost'.
local function fail_one(id, token, kind, message, retry_in)
  -- A cancelled job's failure is recorded before it ends cancelled.
  local job, outcome = reported(id, token, false)
  if not job then
    return outcome
  end
  record_error(job, kind, message)
  count('failed')
  window(0, 1, NOW - (tonumber(job.started_at) or NOW))
  local delay = tonumber(retry_in)
  if job.cancel then
    finish(job, 'cancelled')
    return 'cancelled'
  elseif delay then
    local retry_at = NOW + math.max(delay, 1)
    release_lease(job)
    job.state = 'scheduled'
    job.run_at = retry_at
    note_due(retry_at)
    redis.call('ZADD', K_SCHEDULED, int(retry_at), id)
    save(job)
    count('retried')
    emit('retrying', id, message)
    wake(1)
    return 'retrying'
  end
  bury(job, message)
  return 'dead'
end
