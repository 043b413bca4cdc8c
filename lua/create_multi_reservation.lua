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
  Returns: {1, state, version, deadline_ms, fence_token, created_at_ms}; a retry of a
           creation that already landed returns the same reply
  Errors (negative integers): -1 CONFLICT (+ holder, + unit index, + item position from 1),
           -2 INVALID (+ reason), -3 HOLD_ID_REUSED, -18 NOT_READY
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/first_conflict.lua
--@include lib/load_reservation.lua
--@include lib/emit_transition.lua
--@include lib/walk_auto_steps.lua
--@include lib/settle.lua

local unit_root, record_key, history_key = KEYS[1], KEYS[2], KEYS[3]
local fence_root, events_key, deadlines_key, ready_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id = ARGV[1]
local ttl = {hold = tonumber(ARGV[10]), confirmed = tonumber(ARGV[11]),
  authorized = tonumber(ARGV[12])}
local max_units, retention = tonumber(ARGV[13]), tonumber(ARGV[14])

-- Validate everything before the first write: Redis has no rollback.
if not max_units or not retention then return {OUTCOME.INVALID, 'non-numeric argument'} end
for _, v in pairs(ttl) do if not v or v <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end end
local ok, items = pcall(cjson.decode, ARGV[15])
if not ok or type(items) ~= 'table' or #items < 2 then return {OUTCOME.INVALID, 'items'} end
for _, item in ipairs(items) do
  if type(item) ~= 'table' or #item ~= 7 or type(item[1]) ~= 'string' or item[1] == ''
      or item[1]:find('[{}]') then
    return {OUTCOME.INVALID, 'bad item'}
  end
  for i = 2, 7 do
    if type(item[i]) ~= 'number' then return {OUTCOME.INVALID, 'non-numeric item'} end
  end
  if item[5] < item[4] then return {OUTCOME.INVALID, 'empty interval'} end
  if item[5] - item[4] + 1 > max_units then return {OUTCOME.INVALID, 'too many units'} end
  if not (item[6] <= item[2] and item[2] < item[3] and item[3] <= item[7]) then
    return {OUTCOME.INVALID, 'intervals out of order'}
  end
end
if not pcall(cjson.decode, ARGV[7]) then return {OUTCOME.INVALID, 'metadata is not JSON'} end

if redis.call('EXISTS', ready_key) == 0 then return {OUTCOME.NOT_READY} end

local existing = load_reservation(record_key, id)
if existing then
  if existing.it == ARGV[15] and existing.p == ARGV[2] then
    local t = redis.call('HGET', record_key, 't')
    return {OUTCOME.OK, existing.st, existing.v, existing.dl, tonumber(t), tonumber(existing.c)}
  end
  return {OUTCOME.HOLD_ID_REUSED, 'reservation id names another reservation'}
end

-- All or nothing: every item's units checked before anything is written.
for position, item in ipairs(items) do
  local holder, at = first_conflict(unit_root, item[1], item[4], item[5], id)
  if holder then return {OUTCOME.CONFLICT, holder, at, position} end
end

local now = now_ms()
local cr, pr = ARGV[5] == '1', ARGV[6] == '1'
local path = walk_auto_steps({'INTENT_CREATED'}, cr, pr)
local deadline = now + ttl.hold
for _, state in ipairs(path) do
  if STAGE_TTL[state] then deadline = now + ttl[STAGE_TTL[state]] end
end

local first = items[1]
local token = redis.call('INCR', fence_root .. first[1])
local final = path[#path]
local version = #path - 1
-- The first item stands in the single-resource fields (rs, s, e, f, l, bs, be), so readers
-- that know one resource see a real one; `it` holds them all.
redis.call('HSET', record_key, 'st', final, 'v', version, 'p', ARGV[2], 'vd', ARGV[3],
  'rs', first[1], 'rq', ARGV[4], 's', first[2], 'e', first[3], 'f', first[4], 'l', first[5],
  'bs', first[6], 'be', first[7], 'c', now, 'dl', deadline, 'cr', ARGV[5], 'pr', ARGV[6],
  'x', 0, 't', token, 'md', ARGV[7], 'ik', ARGV[8], 'it', ARGV[15])
local rec = load_reservation(record_key, id)
rec.items = {}
for i, item in ipairs(items) do
  rec.items[i] = {rs = item[1], f = item[4], l = item[5], be = item[7]}
end
local steps = {unpack(path, 2)}
emit_transition(events_key, history_key, rec, path[1], steps, version, ARGV[9], '', ARGV[7],
  ARGV[8], now, deadline, true)
settle(unit_root, record_key, history_key, deadlines_key, rec, final, deadline, retention, 0, now)
return {OUTCOME.OK, final, version, deadline, token, now}
