--[[ Put a partner on the waitlist of one slot of one resource (issue 16), then serve the
  resource's waitlist over that slot at once: when its units are free now (a hold lapsed
  before the reaper ran), the oldest live entry that fits gets its hold in this same call,
  possibly this one.
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
  Returns: {1, state, expires_at_ms, reservation id ('' while waiting), created_at_ms,
           {handoff reservation id, partner id, entry id, deadline, ...}}; a retry of an
           entry that already landed answers its current state
  Errors (negative integers): -2 INVALID (+ reason), -3 HOLD_ID_REUSED (the id names another
           entry)
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/serve_waitlist.lua

local unit_root, entry_key, index_key, queue_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local seq_key, events_key, deadlines_key = KEYS[5], KEYS[6], KEYS[7]
local id, resource = ARGV[1], ARGV[4]
local first, last = tonumber(ARGV[8]), tonumber(ARGV[9])
local entry_ttl, max_units, retention = tonumber(ARGV[15]), tonumber(ARGV[19]), tonumber(ARGV[20])
local ttl = {hold = tonumber(ARGV[16]), confirmed = tonumber(ARGV[17]),
  authorized = tonumber(ARGV[18])}

-- Validate everything before the first write: Redis has no rollback.
if not first or not last or not max_units or not retention or not entry_ttl then
  return {OUTCOME.INVALID, 'non-numeric argument'}
end
if last < first then return {OUTCOME.INVALID, 'empty interval'} end
if last - first + 1 > max_units then return {OUTCOME.INVALID, 'too many units'} end
for _, v in pairs(ttl) do if not v or v <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end end
for i = 6, 11 do
  if not tonumber(ARGV[i]) then return {OUTCOME.INVALID, 'non-numeric time'} end
end
if resource == '' or resource:find('[{}]') then return {OUTCOME.INVALID, 'bad resource id'} end
if id:sub(1, 3) ~= 'wl_' or id:find('[{}]') then return {OUTCOME.INVALID, 'bad entry id'} end
if not pcall(cjson.decode, ARGV[14]) then return {OUTCOME.INVALID, 'metadata is not JSON'} end

local function state_of(key)
  local e = redis.call('HMGET', key, 'st', 'x', 'r', 'c')
  return e[1], tonumber(e[2]), e[3] or '', tonumber(e[4])
end

local now = now_ms()
local existing = redis.call('HMGET', entry_key, 'p', 'rs', 'f', 'l')
if existing[1] then
  if existing[1] == ARGV[2] and existing[2] == resource and tonumber(existing[3]) == first
      and tonumber(existing[4]) == last then
    local st, x, r, c = state_of(entry_key)
    if st == 'waiting' and x <= now then st = 'expired' end
    return {OUTCOME.OK, st, x, r, c, {}}
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
redis.call('PEXPIREAT', entry_key, expires_at + retention)
redis.call('ZADD', queue_key, seq, id)
redis.call('ZADD', index_key, last, first .. ':' .. last)
-- The queue and the index live as long as their longest-lived entry could still wait.
for _, key in ipairs({queue_key, index_key}) do
  if redis.call('PEXPIRETIME', key) < expires_at then redis.call('PEXPIREAT', key, expires_at) end
end

local handoffs = serve_waitlist(unit_root, events_key, deadlines_key, resource, first, last,
  now)
local st, x, r, c = state_of(entry_key)
return {OUTCOME.OK, st, x, r, c, handoffs}
