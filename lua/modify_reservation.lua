--[[ Modify (move) a live reservation: a new slot and/or another resource of the same vendor
  under the same hash tag. All or nothing: the new units are checked excluding the
  reservation's own; on a conflict nothing changes (the old hold stays as it is). Otherwise
  the old units are freed, the new ones taken until the unchanged deadline, the record
  gets the new slot, version + 1, and ONE history/commit-queue entry (fromState = toState,
  reason 'modified') carries the old and the new resource, slot and block.
  KEYS[1] <prefix>{sg:<shard>}:u:          unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:r:<id>      reservation record
  KEYS[3] <prefix>{sg:<shard>}:rh:<id>     reservation history
  KEYS[4] <prefix>{sg:<shard>}:events      the shard's commit-queue stream
  KEYS[5] <prefix>{sg:<shard>}:deadlines   deadline index
  KEYS[6] <prefix>{sg:<shard>}:ready       booked markers rehydrated (no new units without it)
  ARGV[1] reservation id
  ARGV[2] triggered by (partner, ops, admin, system)
  ARGV[3] expected version ('' = any)
  ARGV[4] tenancy: the caller's partner scope ('' = any); another partner's id is NOT_FOUND
  ARGV[5] new resource id
  ARGV[6] the new resource's vendor (must be the reservation's; '' = a resource of no vendor)
  ARGV[7] new slot start ms
  ARGV[8] new slot end ms
  ARGV[9] new first unit index (buffer included)
  ARGV[10] new last unit index (inclusive)
  ARGV[11] new block start ms
  ARGV[12] new block end ms
  ARGV[13] max units one hold may cover
  ARGV[14] metadata (JSON object text)
  ARGV[15] record retention ms after a terminal state
  ARGV[16] reason recorded on the move (optional; default 'modified'; the optimizer's is
           'optimizer')
  Derived keys (issue 16, waitlist handoff): the units a move (or an overdue expiry) frees
  serve the resource's waitlist in this same script (lua/lib/serve_waitlist.lua, keys built
  from the unit root, same hash tag).
  Returns: {1, state, version, deadline_ms, partner id, {field, value, ...}, {history JSON, ...}
           [, {handoff reservation id, partner id, entry id, deadline, ...}]}; EXPIRED carries
           the handoffs 5th; each only when there are some
  Errors: -1 CONFLICT (+ holder, + unit index), -2 INVALID (+ reason), -4 NOT_FOUND,
          -8 INVALID_TRANSITION (+ state), -9 VERSION_MISMATCH (+ current version),
          -11 TERMINAL (+ state), -16 EXPIRED (overdue: now expired, + state, + version,
          + partner), -18 NOT_READY, -19 FOREIGN_RESOURCE (the resource is another vendor's),
          -31 MULTI_RESOURCE (a reservation of several items is not moved)
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/first_conflict.lua
--@include lib/load_reservation.lua
--@include lib/emit_transition.lua
--@include lib/settle.lua
--@include lib/serve_waitlist.lua

local unit_root, record_key, history_key = KEYS[1], KEYS[2], KEYS[3]
local events_key, deadlines_key, ready_key = KEYS[4], KEYS[5], KEYS[6]
local id, actor, resource = ARGV[1], ARGV[2], ARGV[5]
local first, last = tonumber(ARGV[9]), tonumber(ARGV[10])
local max_units, retention = tonumber(ARGV[13]), tonumber(ARGV[15])
local metadata = ARGV[14]
local reason = (ARGV[16] and ARGV[16] ~= '') and ARGV[16] or 'modified'

-- Validate everything before the first write: Redis has no rollback.
if not first or not last or not max_units or not retention then
  return {OUTCOME.INVALID, 'non-numeric argument'}
end
if last < first then return {OUTCOME.INVALID, 'empty interval'} end
if last - first + 1 > max_units then return {OUTCOME.INVALID, 'too many units'} end
for i = 7, 12 do
  if not tonumber(ARGV[i]) then return {OUTCOME.INVALID, 'non-numeric time'} end
end
if resource == '' or resource:find('[{}]') then return {OUTCOME.INVALID, 'bad resource id'} end
if not pcall(cjson.decode, metadata) then return {OUTCOME.INVALID, 'metadata is not JSON'} end

local rec = load_reservation(record_key, id)
if not rec then return {OUTCOME.NOT_FOUND} end
if ARGV[4] ~= '' and rec.p ~= ARGV[4] then return {OUTCOME.NOT_FOUND} end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= rec.v then return {OUTCOME.VERSION_MISMATCH, rec.v} end
if TERMINAL[rec.st] then return {OUTCOME.TERMINAL, rec.st} end
if not PRE_COMMIT[rec.st] then return {OUTCOME.INVALID_TRANSITION, rec.st} end
if ARGV[6] ~= '' and ARGV[6] ~= rec.vd then return {OUTCOME.FOREIGN_RESOURCE} end
if rec.it ~= '' then return {OUTCOME.MULTI_RESOURCE} end

local now = now_ms()
local state = rec.st
if rec.dl <= now then
  -- Expired in fact: record it (idempotent with the reaper) and refuse the move.
  local final = EXPIRES_AS[state]
  local v = rec.v + 1
  emit_transition(events_key, history_key, rec, state, {final}, v, actor, 'deadline passed',
    '{}', '', now, '')
  if final:sub(1, 7) == 'FAILED_' then
    redis.call('HSET', record_key, 'st', final, 'v', v, 'fr', 'deadline passed')
  else
    redis.call('HSET', record_key, 'st', final, 'v', v)
  end
  settle(unit_root, record_key, history_key, deadlines_key, rec, final, rec.dl, retention, 0, now)
  local handoffs = serve_waitlist(unit_root, events_key, deadlines_key, rec.rs, rec.f, rec.l,
    now)
  if #handoffs > 0 then return {OUTCOME.EXPIRED, final, v, rec.p, handoffs} end
  return {OUTCOME.EXPIRED, final, v, rec.p}
end
if redis.call('EXISTS', ready_key) == 0 then return {OUTCOME.NOT_READY} end

-- The new units, excluding the reservation's own (a move may overlap its old slot).
local holder, at = first_conflict(unit_root, resource, first, last, id)
if holder then return {OUTCOME.CONFLICT, holder, at} end

-- Free the old units, then take the new ones until the unchanged deadline (settle).
free_units(unit_root, rec.rs, rec.f, rec.l, id)
local v = rec.v + 1
local old = {rec.rs, rec.s, rec.e, rec.bs, rec.be}
local old_first, old_last = rec.f, rec.l
rec.rs, rec.s, rec.e, rec.f, rec.l = resource, ARGV[7], ARGV[8], first, last
rec.bs, rec.be = ARGV[11], ARGV[12]
-- Issue 13: the new slot was checked against the vendor's availability; an old flag goes.
redis.call('HDEL', record_key, 'ua')
redis.call('HSET', record_key, 'v', v, 'rs', rec.rs, 's', rec.s, 'e', rec.e, 'f', first,
  'l', last, 'bs', rec.bs, 'be', rec.be)
emit_transition(events_key, history_key, rec, state, {state}, v, actor, reason, metadata,
  '', now, rec.dl, false,
  {'movedFromResourceId', old[1], 'movedFromSlotStart', old[2], 'movedFromSlotEnd', old[3],
   'movedFromBlockStart', old[4], 'movedFromBlockEnd', old[5],
   'movedToResourceId', rec.rs, 'movedToSlotStart', rec.s, 'movedToSlotEnd', rec.e,
   'movedToBlockStart', rec.bs, 'movedToBlockEnd', rec.be})
settle(unit_root, record_key, history_key, deadlines_key, rec, state, rec.dl, retention, 0, now)
-- The old units it left serve the waitlist (the new ones are taken already).
local handoffs = serve_waitlist(unit_root, events_key, deadlines_key, old[1], old_first,
  old_last, now)
local out = {OUTCOME.OK, state, v, rec.dl, rec.p, redis.call('HGETALL', record_key),
  redis.call('LRANGE', history_key, 0, -1)}
if #handoffs > 0 then out[8] = handoffs end
return out
