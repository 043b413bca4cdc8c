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
  Returns: {1, state, version, deadline_ms, fence_token, created_at_ms, resource id}; a retry
           of a creation that already landed returns the same reply
  Errors (negative integers): -2 INVALID (+ reason), -3 HOLD_ID_REUSED, -18 NOT_READY,
           -30 POOL_FULL (+ number of candidates)
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/first_conflict.lua
--@include lib/best_fit.lua
--@include lib/load_reservation.lua
--@include lib/emit_transition.lua
--@include lib/walk_auto_steps.lua
--@include lib/settle.lua

local unit_root, record_key, history_key = KEYS[1], KEYS[2], KEYS[3]
local fence_root, events_key, deadlines_key, ready_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id = ARGV[1]
local ttl = {hold = tonumber(ARGV[15]), confirmed = tonumber(ARGV[16]),
  authorized = tonumber(ARGV[17])}
local max_units, retention = tonumber(ARGV[18]), tonumber(ARGV[19])
local window, n = tonumber(ARGV[9]), tonumber(ARGV[20])

-- Validate everything before the first write: Redis has no rollback.
if not max_units or not retention or not window or not n or n < 1 then
  return {OUTCOME.INVALID, 'non-numeric argument'}
end
if #ARGV ~= 20 + 5 * n then return {OUTCOME.INVALID, 'candidate list length'} end
for _, v in pairs(ttl) do if not v or v <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end end
if not tonumber(ARGV[6]) or not tonumber(ARGV[7]) then return {OUTCOME.INVALID, 'non-numeric time'} end
local candidates = {}
for k = 0, n - 1 do
  local b = 21 + 5 * k
  local c = {rs = ARGV[b], f = tonumber(ARGV[b + 1]), l = tonumber(ARGV[b + 2]),
    bs = ARGV[b + 3], be = ARGV[b + 4]}
  if c.rs == '' or c.rs:find('[{}]') then return {OUTCOME.INVALID, 'bad resource id'} end
  if not c.f or not c.l or not tonumber(c.bs) or not tonumber(c.be) then
    return {OUTCOME.INVALID, 'non-numeric candidate'}
  end
  if c.l < c.f then return {OUTCOME.INVALID, 'empty interval'} end
  if c.l - c.f + 1 > max_units then return {OUTCOME.INVALID, 'too many units'} end
  candidates[#candidates + 1] = c
end
if not pcall(cjson.decode, ARGV[12]) then return {OUTCOME.INVALID, 'metadata is not JSON'} end

if redis.call('EXISTS', ready_key) == 0 then return {OUTCOME.NOT_READY} end

local existing = load_reservation(record_key, id)
if existing then
  for _, c in ipairs(candidates) do
    if existing.rs == c.rs and existing.f == c.f and existing.l == c.l and existing.p == ARGV[2] then
      local t = redis.call('HGET', record_key, 't')
      return {OUTCOME.OK, existing.st, existing.v, existing.dl, tonumber(t),
        tonumber(existing.c), existing.rs}
    end
  end
  return {OUTCOME.HOLD_ID_REUSED, 'reservation id names another reservation'}
end

local chosen
if ARGV[8] == 'tightest' then
  chosen = best_fit(unit_root, candidates, id, window)
else
  for _, c in ipairs(candidates) do
    if not first_conflict(unit_root, c.rs, c.f, c.l, id) then chosen = c; break end
  end
end
if not chosen then return {OUTCOME.POOL_FULL, n} end

local now = now_ms()
local cr, pr = ARGV[10] == '1', ARGV[11] == '1'
local path = walk_auto_steps({'INTENT_CREATED'}, cr, pr)
local deadline = now + ttl.hold
for _, state in ipairs(path) do
  if STAGE_TTL[state] then deadline = now + ttl[STAGE_TTL[state]] end
end

local token = redis.call('INCR', fence_root .. chosen.rs)
local final = path[#path]
local version = #path - 1
redis.call('HSET', record_key, 'st', final, 'v', version, 'p', ARGV[2], 'vd', ARGV[3],
  'rs', chosen.rs, 'rq', ARGV[5], 's', ARGV[6], 'e', ARGV[7], 'f', chosen.f, 'l', chosen.l,
  'bs', chosen.bs, 'be', chosen.be, 'c', now, 'dl', deadline, 'cr', ARGV[10], 'pr', ARGV[11],
  'x', 0, 't', token, 'md', ARGV[12], 'ik', ARGV[13], 'g', ARGV[4])
local rec = load_reservation(record_key, id)
local steps = {unpack(path, 2)}
emit_transition(events_key, history_key, rec, path[1], steps, version, ARGV[14], '', ARGV[12],
  ARGV[13], now, deadline, true, {'resourceGroupId', ARGV[4]})
settle(unit_root, record_key, history_key, deadlines_key, rec, final, deadline, retention, 0, now)
return {OUTCOME.OK, final, version, deadline, token, now, chosen.rs}
