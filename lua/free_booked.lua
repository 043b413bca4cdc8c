--[[ Free the units of a cancelled booking (issue 12): delete the booked markers that are
  still this booking's, nothing else; and record the cancellation (issue 14): the
  reservation moves COMMITTED -> CANCELLED in one commit-queue entry (the worker writes its
  history, audit and snapshot rows and its `booking.cancelled` event), once.
  KEYS[1] <prefix>{sg:<shard>}:u:          unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:r:<id>      reservation record (may be gone: retention)
  KEYS[3] <prefix>{sg:<shard>}:rh:<id>     reservation history
  KEYS[4] <prefix>{sg:<shard>}:events      the shard's commit-queue stream
  ARGV[1] resource id
  ARGV[2] first unit index
  ARGV[3] last unit index (inclusive)
  ARGV[4] reservation id of the booking
  ARGV[5] the version the cancellation takes when the record is gone (Postgres' version + 1;
          0: record nothing, Postgres has it already)
  ARGV[6] triggered by (the canceller's role)
  ARGV[7] reason ('' for none)
  ARGV[8] metadata (JSON object text: the booking and its refunds)
  Returns: {1, markers_deleted, version recorded now (0: none: already cancelled, or not
           committed yet)}
  Errors (negative integers): -2 INVALID
]]
--@include @outcomes
--@include @lifecycle
--@include lib/unit_key.lua
--@include lib/now_ms.lua
--@include lib/load_reservation.lua
--@include lib/emit_transition.lua

local unit_root, record_key, history_key, events_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local resource, id = ARGV[1], ARGV[4]
local first, last = tonumber(ARGV[2]), tonumber(ARGV[3])
local fallback_version = tonumber(ARGV[5])
if not first or not last or last < first or not fallback_version then
  return {OUTCOME.INVALID}
end
if not pcall(cjson.decode, ARGV[8]) then return {OUTCOME.INVALID, 'metadata is not JSON'} end
local marker = BOOKED_PREFIX .. id
local deleted = 0
for i = first, last do
  local key = unit_key(unit_root, resource, i)
  if redis.call('GET', key) == marker then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
end
local now = now_ms()
local rec = load_reservation(record_key, id)
local version = 0
if rec then
  -- CANCELLED: recorded by an earlier call. Anything but COMMITTED: the commit is not
  -- finished in Redis (the worker finalizes it); nothing is recorded.
  if rec.st == 'COMMITTED' then
    version = rec.v + 1
    emit_transition(events_key, history_key, rec, 'COMMITTED', {'CANCELLED'}, version,
      ARGV[6], ARGV[7], ARGV[8], '', now, '', false, nil)
    redis.call('HSET', record_key, 'st', 'CANCELLED', 'v', version)
  end
elseif fallback_version > 0 then
  -- The record is gone (its retention passed): the entry alone, at the version Postgres
  -- expects next; a repeated call repeats the same event id, written once.
  version = fallback_version
  local fields = {'reservationId', id, 'version', version, 'fromState', 'COMMITTED',
    'toState', 'CANCELLED', 'triggeredBy', ARGV[6], 'timestamp', now}
  if ARGV[7] ~= '' then fields[#fields + 1] = 'reason'; fields[#fields + 1] = ARGV[7] end
  if ARGV[8] ~= '{}' then fields[#fields + 1] = 'metadata'; fields[#fields + 1] = ARGV[8] end
  redis.call('XADD', events_key, '*', unpack(fields))
end
return {OUTCOME.OK, deleted, version}
