--[[ Create a reservation: hold every unit of its buffered interval and walk it from
  INTENT_CREATED as far as the vendor's policy allows, recording the walk as ONE entry.
  KEYS[1] <prefix>{sg:<shard>}:u:                unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:r:<id>            reservation record (hash)
  KEYS[3] <prefix>{sg:<shard>}:rh:<id>           reservation history (list of JSON entries)
  KEYS[4] <prefix>{sg:<shard>}:fence:<resource>  per-resource fencing counter
  KEYS[5] <prefix>{sg:<shard>}:events            the shard's commit-queue stream
  KEYS[6] <prefix>{sg:<shard>}:deadlines         deadline index (zset id -> deadline ms)
  KEYS[7] <prefix>{sg:<shard>}:ready             set once the shard's booked markers are
                                                 rehydrated from Postgres (lost with the data)
  KEYS[8] (optional) <prefix>{sg:<shard>}:avr:<resource>  the vendor's availability rules
                                                 revision (issue 13)
  ARGV[1] reservation id
  ARGV[2] partner id
  ARGV[3] vendor id
  ARGV[4] resource id
  ARGV[5] requester id
  ARGV[6] slot start ms
  ARGV[7] slot end ms
  ARGV[8] first unit index (buffer included)
  ARGV[9] last unit index (inclusive, buffer included)
  ARGV[10] block start ms (buffered interval)
  ARGV[11] block end ms
  ARGV[12] vendor confirmation required (1/0)
  ARGV[13] payment required (1/0)
  ARGV[14] metadata (JSON object text)
  ARGV[15] idempotency key ('' for none)
  ARGV[16] triggered by (partner, system, ...)
  ARGV[17] hold stage ttl ms
  ARGV[18] confirmed stage ttl ms
  ARGV[19] authorized stage ttl ms
  ARGV[20] max units one hold may cover
  ARGV[21] record retention ms after a terminal state
  ARGV[22] (optional) the availability rules revision the caller checked the slot against
           ('' = no check); another revision in KEYS[8] ('0' when absent) is RULES_STALE
  Returns: {1, state, version, deadline_ms, fence_token, created_at_ms}; a retry of a
           creation that already landed returns the same reply
  Derived keys (issue 16, waitlist handoff): before taking units the resource's waitlist is
  served (lua/lib/serve_waitlist.lua, keys built from the unit root, same hash tag), so a
  slot whose hold lapsed goes to its oldest waiting entry, never to this caller first.
  Errors (negative integers): -1 CONFLICT (+ holder, + unit index[, + {handoffs}: holds placed
           for waitlist entries by this call, as lua/transition.lua reports them]), -2 INVALID (+ reason),
           -3 HOLD_ID_REUSED, -18 NOT_READY (booked markers not rehydrated since Redis lost data),
           -25 RULES_STALE (+ the revision now published)
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/check_units.lua
--@include lib/check_creation.lua
--@include lib/rules_stale.lua
--@include lib/replayed_creation.lua
--@include lib/first_conflict.lua
--@include lib/place_reservation.lua
--@include lib/serve_waitlist.lua

local unit_root, ready_key = KEYS[1], KEYS[7]
local k = {unit_root = unit_root, record = KEYS[2], history = KEYS[3], fence = KEYS[4],
  events = KEYS[5], deadlines = KEYS[6]}
local id, resource = ARGV[1], ARGV[4]
local first, last = tonumber(ARGV[8]), tonumber(ARGV[9])
local ttl = {hold = tonumber(ARGV[17]), confirmed = tonumber(ARGV[18]),
  authorized = tonumber(ARGV[19])}
local max_units, retention = tonumber(ARGV[20]), tonumber(ARGV[21])

-- Validate everything before the first write: Redis has no rollback.
local invalid = check_creation(ttl, max_units, retention, ARGV[14])
  or check_units(first, last, max_units)
if invalid then return invalid end
if not tonumber(ARGV[6]) or not tonumber(ARGV[7]) or not tonumber(ARGV[10]) or not tonumber(ARGV[11]) then
  return {OUTCOME.INVALID, 'non-numeric time'}
end

-- A Redis that lost its data lost the booked markers too: no hold until they are back.
if redis.call('EXISTS', ready_key) == 0 then return {OUTCOME.NOT_READY} end

local replay = replayed_creation(k.record, id, function(existing)
  return existing.rs == resource and existing.f == first and existing.l == last
    and existing.p == ARGV[2]
end)
if replay then return replay end

-- Availability rules (issue 13): the caller checked the slot against the vendor's rules at
-- revision ARGV[22]; a newer one published beside the units means they changed meanwhile.
local stale = KEYS[8] and rules_stale({KEYS[8]}, ARGV[22])
if stale then return stale end

-- Waiting entries first (issue 16): a slot whose hold lapsed is theirs before it is ours.
local handoffs = serve_waitlist(unit_root, k.events, k.deadlines, resource, first, last,
  now_ms())
local holder, at = first_conflict(unit_root, resource, first, last, id)
if holder then
  if #handoffs > 0 then return {OUTCOME.CONFLICT, holder, at, handoffs} end
  return {OUTCOME.CONFLICT, holder, at}
end

local now = now_ms()
local final, version, deadline, token = place_reservation(k, {id = id, p = ARGV[2],
  vd = ARGV[3], rs = resource, rq = ARGV[5], s = ARGV[6], e = ARGV[7], f = first, l = last,
  bs = ARGV[10], be = ARGV[11], cr = ARGV[12], pr = ARGV[13], md = ARGV[14], ik = ARGV[15]},
  ttl, ARGV[16], '', retention, now)
return {OUTCOME.OK, final, version, deadline, token, now}
