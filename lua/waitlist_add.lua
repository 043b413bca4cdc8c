--[[ Put a partner on the waitlist of one slot of one resource, or of any member of a
  resource group (issue 16), then serve the waitlist over that slot at once: when units are
  free now (a hold lapsed before the reaper ran), the oldest live entry that fits gets its
  hold in this same call, possibly this one. A group entry is queued on every member (in the
  member's queue of its own units, beside the entries naming that resource) and served on
  the member the group's strategy picks (lua/lib/serve_waitlist.lua).
  KEYS[1] <prefix>{sg:<shard>}:u:               unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:wl:<entry id>    the entry (hash)
  KEYS[3] <prefix>{sg:<shard>}:wli:<resource>   the resource's slots with waiting entries
  KEYS[4] <prefix>{sg:<shard>}:wlq:<resource>:<first>:<last>   the slot's entries (FIFO)
  KEYS[5] <prefix>{sg:<shard>}:wlseq            the shard's FIFO counter
  KEYS[6] <prefix>{sg:<shard>}:events           the shard's commit-queue stream (handoffs)
  KEYS[7] <prefix>{sg:<shard>}:deadlines        deadline index (handoffs)
  ARGV[1] entry id (wl_<shard>_<ulid>)
  ARGV[2] partner id
  ARGV[3] vendor id
  ARGV[4] resource id
  ARGV[5] requester id
  ARGV[6] slot start ms
  ARGV[7] slot end ms
  ARGV[8] first unit index (buffer included)
  ARGV[9] last unit index (inclusive, buffer included)
  ARGV[10] block start ms
  ARGV[11] block end ms
  ARGV[12] vendor confirmation required (1/0)
  ARGV[13] payment required (1/0)
  ARGV[14] metadata of the hold the entry becomes (JSON object text)
  ARGV[15] entry ttl ms: the entry expires at min(now + ttl, slot start)
  ARGV[16] hold stage ttl ms (of the hold the entry becomes: kept in the entry)
  ARGV[17] confirmed stage ttl ms (idem)
  ARGV[18] authorized stage ttl ms (idem)
  ARGV[19] max units one hold may cover
  ARGV[20] record retention ms: of the hold it becomes, and a finished entry stays readable
           this long after its expiry
  ARGV[21] (optional) resource group id ('' or absent: an entry on ARGV[4] alone)
  ARGV[22] (group) choice: 'first' or 'tightest' (best fit), as create_pooled_reservation.lua
  ARGV[23] (group) best-fit window: units looked at on each side of the stay
  ARGV[24] (group) members in the strategy's order: JSON [[resource, first unit, last unit,
           block start ms, block end ms], ...]; the first is ARGV[4] with ARGV[8..11], whose
           index and queue are KEYS[3] and KEYS[4]; the other members' keys are derived from
           the unit root (<root>wli:<member>, <root>wlq:<member>:<first>:<last>), same tag
  Returns: {1, state, expires_at_ms, reservation id ('' while waiting), created_at_ms,
           {handoff reservation id, partner id, entry id, deadline, ...}, resource id (a
           group entry's: '' while waiting, the member it got once fulfilled)}; a retry of
           an entry that already landed answers its current state
  Errors (negative integers): -2 INVALID (+ reason), -3 HOLD_ID_REUSED (the id names another
           entry)
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/check_units.lua
--@include lib/serve_waitlist.lua

local unit_root, entry_key, index_key, queue_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local seq_key, events_key, deadlines_key = KEYS[5], KEYS[6], KEYS[7]
local id, resource = ARGV[1], ARGV[4]
local first, last = tonumber(ARGV[8]), tonumber(ARGV[9])
local entry_ttl, max_units, retention = tonumber(ARGV[15]), tonumber(ARGV[19]), tonumber(ARGV[20])
local ttl = {hold = tonumber(ARGV[16]), confirmed = tonumber(ARGV[17]),
  authorized = tonumber(ARGV[18])}

-- Validate everything before the first write: Redis has no rollback.
if not max_units or not retention or not entry_ttl then
  return {OUTCOME.INVALID, 'non-numeric argument'}
end
local invalid = check_units(first, last, max_units)
if invalid then return invalid end
for _, v in pairs(ttl) do if not v or v <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end end
for i = 6, 11 do
  if not tonumber(ARGV[i]) then return {OUTCOME.INVALID, 'non-numeric time'} end
end
if resource == '' or resource:find('[{}]') then return {OUTCOME.INVALID, 'bad resource id'} end
if id:sub(1, 3) ~= 'wl_' or id:find('[{}]') then return {OUTCOME.INVALID, 'bad entry id'} end
if not pcall(cjson.decode, ARGV[14]) then return {OUTCOME.INVALID, 'metadata is not JSON'} end
local group = ARGV[21] or ''
local members = {{rs = resource, f = first, l = last}}
if group ~= '' then
  if group:find('[{}]') or (ARGV[22] ~= 'first' and ARGV[22] ~= 'tightest')
      or not tonumber(ARGV[23]) then
    return {OUTCOME.INVALID, 'bad group'}
  end
  local ok, listed = pcall(cjson.decode, ARGV[24])
  if not ok or type(listed) ~= 'table' or #listed < 1 then
    return {OUTCOME.INVALID, 'bad group members'}
  end
  for i, m in ipairs(listed) do
    if type(m) ~= 'table' or #m ~= 5 or type(m[1]) ~= 'string' or m[1] == ''
        or m[1]:find('[{}]') or type(m[4]) ~= 'number' or type(m[5]) ~= 'number' then
      return {OUTCOME.INVALID, 'bad group member'}
    end
    invalid = check_units(tonumber(m[2]), tonumber(m[3]), max_units)
    if invalid then return invalid end
    members[i] = {rs = m[1], f = m[2], l = m[3]}
  end
  if members[1].rs ~= resource or members[1].f ~= first or members[1].l ~= last then
    return {OUTCOME.INVALID, 'the first member is not ARGV[4]'}
  end
end

local function state_of(key)
  local e = redis.call('HMGET', key, 'st', 'x', 'r', 'c', 'rs')
  return e[1], tonumber(e[2]), e[3] or '', tonumber(e[4]), e[5] or ''
end

local now = now_ms()
local existing = redis.call('HMGET', entry_key, 'p', 'rs', 'f', 'l', 'g')
if existing[1] then
  local same = existing[1] == ARGV[2] and (existing[5] or '') == group
  if group == '' then
    same = same and existing[2] == resource and tonumber(existing[3]) == first
      and tonumber(existing[4]) == last
  end
  if same then
    local st, x, r, c, rs = state_of(entry_key)
    if st == 'waiting' and x <= now then st = 'expired' end
    return {OUTCOME.OK, st, x, r, c, {}, rs}
  end
  return {OUTCOME.HOLD_ID_REUSED, 'entry id names another entry'}
end

local expires_at = math.min(now + entry_ttl, tonumber(ARGV[6]))
if expires_at <= now then return {OUTCOME.INVALID, 'the entry would expire at once'} end

local seq = redis.call('INCR', seq_key)
redis.call('HSET', entry_key, 'st', 'waiting', 'p', ARGV[2], 'vd', ARGV[3], 'rs', resource,
  'rq', ARGV[5], 's', ARGV[6], 'e', ARGV[7], 'f', first, 'l', last, 'bs', ARGV[10],
  'be', ARGV[11], 'cr', ARGV[12], 'pr', ARGV[13], 'md', ARGV[14], 'c', now, 'x', expires_at,
  'q', seq, 'th', ttl.hold, 'tc', ttl.confirmed, 'ta', ttl.authorized, 'rt', retention)
if group ~= '' then
  -- A group entry names no resource until it is fulfilled (then the member it got).
  redis.call('HSET', entry_key, 'rs', '', 'g', group, 'gc', ARGV[24], 'ch', ARGV[22],
    'gw', ARGV[23])
end
redis.call('PEXPIREAT', entry_key, expires_at + retention)
local root = unit_root:sub(1, -3)
for i, m in ipairs(members) do
  local slot = m.f .. ':' .. m.l
  local q_key = i == 1 and queue_key or root .. 'wlq:' .. m.rs .. ':' .. slot
  local i_key = i == 1 and index_key or root .. 'wli:' .. m.rs
  redis.call('ZADD', q_key, seq, id)
  redis.call('ZADD', i_key, m.l, slot)
  -- The queue and the index live as long as their longest-lived entry could still wait.
  for _, key in ipairs({q_key, i_key}) do
    if redis.call('PEXPIRETIME', key) < expires_at then redis.call('PEXPIREAT', key, expires_at) end
  end
end

local handoffs = serve_waitlists(unit_root, events_key, deadlines_key, members, now)
local st, x, r, c, rs = state_of(entry_key)
return {OUTCOME.OK, st, x, r, c, handoffs, rs}
