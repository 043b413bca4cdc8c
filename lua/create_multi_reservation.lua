--[[ Create a multi-resource reservation (issue 16): hold every unit of every item (a room and
  a table; three consecutive appointments), all or nothing, and walk it as
  create_reservation.lua does. One item taken anywhere: nothing is written. Every item's
  resource shares the hash tag (a vendor's resources share its shard key).
  KEYS[1] <prefix>{sg:<shard>}:u:          unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:r:<id>      reservation record (hash)
  KEYS[3] <prefix>{sg:<shard>}:rh:<id>     reservation history (list of JSON entries)
  KEYS[4] <prefix>{sg:<shard>}:fence:      fence root; a resource's counter is <root><resource>
  KEYS[5] <prefix>{sg:<shard>}:events      the shard's commit-queue stream
  KEYS[6] <prefix>{sg:<shard>}:deadlines   deadline index
  KEYS[7] <prefix>{sg:<shard>}:ready       booked markers rehydrated (no hold without it)
  ARGV[1] reservation id
  ARGV[2] partner id
  ARGV[3] vendor id
  ARGV[4] requester id
  ARGV[5] vendor confirmation required (1/0)
  ARGV[6] payment required (1/0)
  ARGV[7] metadata (JSON object text)
  ARGV[8] idempotency key ('' for none)
  ARGV[9] triggered by
  ARGV[10] hold stage ttl ms
  ARGV[11] confirmed stage ttl ms
  ARGV[12] authorized stage ttl ms
  ARGV[13] max units one item may cover
  ARGV[14] record retention ms after a terminal state
  ARGV[15] items: JSON [[resource, slot start ms, slot end ms, first unit, last unit,
           block start ms, block end ms], ...] (2 or more; items on one resource do not
           overlap: the caller checks it)
  ARGV[16] (optional) the availability rules revision the caller checked the items against
           ('' = no check); another revision published beside any item's resource
           (<root>avr:<resource>, '0' when absent) is RULES_STALE (issue 13)
  Derived keys (issue 16): before checking, each item's waitlist is served over its units
  (lua/lib/serve_waitlist.lua), so units whose hold lapsed go to the oldest waiting entry
  first, never to this caller; the availability revision keys <root>avr:<resource>. All
  share the unit root's hash tag.
  Returns: {1, state, version, deadline_ms, fence_token, created_at_ms}; a retry of a
           creation that already landed returns the same reply
  Errors (negative integers): -1 CONFLICT (+ holder, + unit index, + item position from 1
           [, + {handoffs}: holds placed for waitlist entries by this call, as
           lua/transition.lua reports them]), -2 INVALID (+ reason), -3 HOLD_ID_REUSED,
           -18 NOT_READY, -25 RULES_STALE (+ the revision now published)
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

local unit_root, fence_root, ready_key = KEYS[1], KEYS[4], KEYS[7]
local k = {unit_root = unit_root, record = KEYS[2], history = KEYS[3], events = KEYS[5],
  deadlines = KEYS[6]}
local id = ARGV[1]
local ttl = {hold = tonumber(ARGV[10]), confirmed = tonumber(ARGV[11]),
  authorized = tonumber(ARGV[12])}
local max_units, retention = tonumber(ARGV[13]), tonumber(ARGV[14])

-- Validate everything before the first write: Redis has no rollback.
local invalid = check_creation(ttl, max_units, retention, ARGV[7])
if invalid then return invalid end
local ok, items = pcall(cjson.decode, ARGV[15])
if not ok or type(items) ~= 'table' or #items < 2 then return {OUTCOME.INVALID, 'items'} end
local root = unit_root:sub(1, -3)
local revision_keys, listed = {}, {}
for i, item in ipairs(items) do
  if type(item) ~= 'table' or #item ~= 7 or type(item[1]) ~= 'string' or item[1] == ''
      or item[1]:find('[{}]') then
    return {OUTCOME.INVALID, 'bad item'}
  end
  for i = 2, 7 do
    if type(item[i]) ~= 'number' then return {OUTCOME.INVALID, 'non-numeric item'} end
  end
  invalid = check_units(item[4], item[5], max_units)
  if invalid then return invalid end
  if not (item[6] <= item[2] and item[2] < item[3] and item[3] <= item[7]) then
    return {OUTCOME.INVALID, 'intervals out of order'}
  end
  revision_keys[i] = root .. 'avr:' .. item[1]
  listed[i] = {rs = item[1], f = item[4], l = item[5], be = item[7]}
end

if redis.call('EXISTS', ready_key) == 0 then return {OUTCOME.NOT_READY} end

local replay = replayed_creation(k.record, id, function(existing)
  return existing.it == ARGV[15] and existing.p == ARGV[2]
end)
if replay then return replay end

local stale = rules_stale(revision_keys, ARGV[16])
if stale then return stale end

-- Waiting entries first (issue 16): units whose hold lapsed are theirs before they are ours.
local handoffs = serve_waitlists(unit_root, k.events, k.deadlines, listed, now_ms())

-- All or nothing: every item's units checked before anything is written.
for position, item in ipairs(items) do
  local holder, at = first_conflict(unit_root, item[1], item[4], item[5], id)
  if holder then
    if #handoffs > 0 then return {OUTCOME.CONFLICT, holder, at, position, handoffs} end
    return {OUTCOME.CONFLICT, holder, at, position}
  end
end

local now = now_ms()
local first = items[1]
k.fence = fence_root .. first[1]
-- The first item stands in the single-resource fields (rs, s, e, f, l, bs, be), so readers
-- that know one resource see a real one; `it` holds them all.
local final, version, deadline, token = place_reservation(k, {id = id, p = ARGV[2],
  vd = ARGV[3], rs = first[1], rq = ARGV[4], s = first[2], e = first[3], f = first[4],
  l = first[5], bs = first[6], be = first[7], cr = ARGV[5], pr = ARGV[6], md = ARGV[7],
  ik = ARGV[8]}, ttl, ARGV[9], '', retention, now, {'it', ARGV[15]}, nil, listed)
return {OUTCOME.OK, final, version, deadline, token, now}
