-- report: the outcomes of many attempts in one call (a worker coalesces the reports of
-- all its slots), then claims the worker's next jobs in the same round trip.
-- KEYS: the queue's keys (see common.lua)
-- ARGV[1] '' (Redis's clock), ARGV[2] events max
-- ARGV[3] worker id, ARGV[4] jobs to claim next (0 for none), ARGV[5] lease ms,
-- ARGV[6] default max attempts, ARGV[7] number of reports n, then six per report:
--   'c', id, lease token, result bytes, record template, extras     (completed; see
--                                                                    complete_claimed,
--                                                                    '' '' for none)
--   'f', id, lease token, error kind, error message, retry in ms    (failed; '' for
--                                                                    no retry: dead)
-- Returns: {outcome per report..., then the claim's reply (see claim.lua), or -1 when
-- none was asked for} (flat: a table in a reply costs Redis a dozen lookups); outcomes are 'completed', 'retrying',
-- 'dead', 'cancelled' or 'lost' (the lease is no longer this worker's: nothing changed)
local n = tonumber(ARGV[7])
local outcomes = {}
-- Counters and the outcome window are written once for the whole batch (claim
-- included), events in shared entries.
start_batch()
-- A completion's writes are held back until the reports are done (see `hold`): a
-- later report of a job completed in the same call finds its lease ended, as it would
-- have if the completion had been written at once (the other outcomes write at once).
local completed = {}
for i = 0, n - 1 do
  local at = 8 + i * 6
  local id = ARGV[at + 1]
  if completed[id] then
    outcomes[i + 1] = 'lost'
  elseif ARGV[at] == 'c' then
    outcomes[i + 1] = complete_one(id, ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5])
    completed[id] = outcomes[i + 1] == 'completed'
  else
    outcomes[i + 1] = fail_one(id, ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5])
  end
end
flush_held()
local m = tonumber(ARGV[4])
if m > 0 then
  claim(ARGV[3], m, tonumber(ARGV[5]), tonumber(ARGV[6]), outcomes)
else
  outcomes[n + 1] = -1
end
end_batch()
return outcomes
