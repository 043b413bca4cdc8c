--[[ Create a pooled reservation (issue 16): choose a free member of a resource group and hold
  every unit of its buffered interval, then walk the reservation as create_reservation.lua
  does. The choice and the hold are one script, so no member can be taken between them and
  the pool is never reported full while a member is free. Every member shares the hash tag.
  KEYS[1] <prefix>{sg:<shard>}:u:          unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:r:<id>      reservation record (hash)
  KEYS[3] <prefix>{sg:<shard>}:rh:<id>     reservation history (list of JSON entries)
  KEYS[4] <prefix>{sg:<shard>}:fence:      fence root; a member's counter is <root><resource>
  KEYS[5] <prefix>{sg:<shard>}:events      the shard's commit-queue stream
  KEYS[6] <prefix>{sg:<shard>}:deadlines   deadline index
  KEYS[7] <prefix>{sg:<shard>}:ready       booked markers rehydrated (no hold without it)
  ARGV[1] reservation id
  ARGV[2] partner id
  ARGV[3] vendor id
  ARGV[4] resource group id
  ARGV[5] requester id
  ARGV[6] slot start ms
  ARGV[7] slot end ms
  ARGV[8] choice: 'first' (first free candidate in order) or 'tightest' (best fit: the free
          candidate with the fewest free units around the stay, ties to the earlier)
  ARGV[9] best-fit window: units looked at on each side of the stay
  ARGV[10] vendor confirmation required (1/0)
  ARGV[11] payment required (1/0)
  ARGV[12] metadata (JSON object text)
  ARGV[13] idempotency key ('' for none)
  ARGV[14] triggered by
  ARGV[15] hold stage ttl ms
  ARGV[16] confirmed stage ttl ms
  ARGV[17] authorized stage ttl ms
  ARGV[18] max units one hold may cover
  ARGV[19] record retention ms after a terminal state
  ARGV[20] number of candidates n, then 5 values per candidate from ARGV[21]:
           resource id, first unit, last unit (buffers included), block start ms, block end ms
  ARGV[21 + 5n] (optional) the availability rules revision the caller checked the candidates
           against ('' = no check); another revision published beside any candidate
           (<root>avr:<resource>, '0' when absent) is RULES_STALE (issue 13)
  Derived keys (issue 16): before choosing, each candidate's waitlist is served over its
  units (lua/lib/serve_waitlist.lua: entries on the member or on a group it is in, FIFO), so
  a member whose hold lapsed goes to the oldest waiting entry first, never to this caller;
  the availability revision keys <root>avr:<resource>. All share the unit root's hash tag.
  Returns: {1, state, version, deadline_ms, fence_token, created_at_ms, resource id
           [, {handoffs}: holds placed for waitlist entries by this call, as
           lua/transition.lua reports them]}; a retry of a creation that already landed
           returns the same reply
  Errors (negative integers): -2 INVALID (+ reason), -3 HOLD_ID_REUSED, -18 NOT_READY,
           -25 RULES_STALE (+ the revision now published), -30 POOL_FULL (+ number of
           candidates[, + {handoffs}])
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/check_units.lua
--@include lib/check_creation.lua
--@include lib/rules_stale.lua
--@include lib/replayed_creation.lua
--@include lib/choose_member.lua
--@include lib/place_reservation.lua
--@include lib/serve_waitlist.lua

local unit_root, fence_root, ready_key = KEYS[1], KEYS[4], KEYS[7]
local k = {unit_root = unit_root, record = KEYS[2], history = KEYS[3], events = KEYS[5],
  deadlines = KEYS[6]}
local id = ARGV[1]
local ttl = {hold = tonumber(ARGV[15]), confirmed = tonumber(ARGV[16]),
  authorized = tonumber(ARGV[17])}
local max_units, retention = tonumber(ARGV[18]), tonumber(ARGV[19])
local window, n = tonumber(ARGV[9]), tonumber(ARGV[20])

-- Validate everything before the first write: Redis has no rollback.
if not window or not n or n < 1 then return {OUTCOME.INVALID, 'non-numeric argument'} end
if #ARGV ~= 20 + 5 * n and #ARGV ~= 21 + 5 * n then
  return {OUTCOME.INVALID, 'candidate list length'}
end
local invalid = check_creation(ttl, max_units, retention, ARGV[12])
if invalid then return invalid end
if not tonumber(ARGV[6]) or not tonumber(ARGV[7]) then return {OUTCOME.INVALID, 'non-numeric time'} end
local candidates, revision_keys = {}, {}
local root = unit_root:sub(1, -3)
for c = 0, n - 1 do
  local b = 21 + 5 * c
  local m = {rs = ARGV[b], f = tonumber(ARGV[b + 1]), l = tonumber(ARGV[b + 2]),
    bs = ARGV[b + 3], be = ARGV[b + 4]}
  if m.rs == '' or m.rs:find('[{}]') then return {OUTCOME.INVALID, 'bad resource id'} end
  if not tonumber(m.bs) or not tonumber(m.be) then
    return {OUTCOME.INVALID, 'non-numeric candidate'}
  end
  invalid = check_units(m.f, m.l, max_units)
  if invalid then return invalid end
  candidates[#candidates + 1] = m
  revision_keys[#revision_keys + 1] = root .. 'avr:' .. m.rs
end

if redis.call('EXISTS', ready_key) == 0 then return {OUTCOME.NOT_READY} end

local replay = replayed_creation(k.record, id, function(existing)
  for _, c in ipairs(candidates) do
    if existing.rs == c.rs and existing.f == c.f and existing.l == c.l
        and existing.p == ARGV[2] then
      return true
    end
  end
  return false
end)
if replay then return replay end

local stale = rules_stale(revision_keys, ARGV[21 + 5 * n])
if stale then return stale end

-- Waiting entries first (issue 16): a member whose hold lapsed is theirs before it is ours.
local handoffs = serve_waitlists(unit_root, k.events, k.deadlines, candidates, now_ms())

local chosen = choose_member(unit_root, candidates, ARGV[8], window, id)
if not chosen then
  if #handoffs > 0 then return {OUTCOME.POOL_FULL, n, handoffs} end
  return {OUTCOME.POOL_FULL, n}
end

local now = now_ms()
k.fence = fence_root .. chosen.rs
local final, version, deadline, token = place_reservation(k, {id = id, p = ARGV[2],
  vd = ARGV[3], rs = chosen.rs, rq = ARGV[5], s = ARGV[6], e = ARGV[7], f = chosen.f,
  l = chosen.l, bs = chosen.bs, be = chosen.be, cr = ARGV[10], pr = ARGV[11], md = ARGV[12],
  ik = ARGV[13]}, ttl, ARGV[14], '', retention, now, {'g', ARGV[4]},
  {'resourceGroupId', ARGV[4]})
local out = {OUTCOME.OK, final, version, deadline, token, now, chosen.rs}
if #handoffs > 0 then out[8] = handoffs end
return out
