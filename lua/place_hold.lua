--[[ Place a capacity-1 hold on every unit [first, last] of one resource, all or nothing.
  KEYS[1] <prefix>{sg:<shard>}:u:                 unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:h:<hold id>        hold record (hash r f l x c n t o)
  KEYS[3] <prefix>{sg:<shard>}:fence:<resource>   per-resource fencing counter
  ARGV[1] hold id
  ARGV[2] resource id
  ARGV[3] first unit index
  ARGV[4] last unit index (inclusive; buffers already included)
  ARGV[5] ttl in ms
  ARGV[6] max units one hold may cover
  ARGV[7] owner (opaque label, e.g. the partner id)
  Returns: {1, expires_at_ms, fence_token, created_at_ms}; a retry of a hold that already
           landed returns the same reply (a script recognises its own hold token)
  Errors (negative integers): -1 CONFLICT (+ holder id, + unit index), -2 INVALID (+ reason),
           -3 HOLD_ID_REUSED (the id names a hold on other units)
]]
--@include @outcomes
--@include lib/now_ms.lua
--@include lib/first_conflict.lua
--@include lib/set_units.lua

local unit_root, record_key, fence_key = KEYS[1], KEYS[2], KEYS[3]
local hold_id, resource = ARGV[1], ARGV[2]
local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, max_units = tonumber(ARGV[5]), tonumber(ARGV[6])
local owner = ARGV[7] or ''

-- Validate everything before the first write: Redis has no rollback.
if not first or not last or not ttl or not max_units then return {OUTCOME.INVALID, 'non-numeric argument'} end
if first ~= math.floor(first) or last ~= math.floor(last) then return {OUTCOME.INVALID, 'unit index not integral'} end
if last < first then return {OUTCOME.INVALID, 'empty interval'} end
if last - first + 1 > max_units then return {OUTCOME.INVALID, 'too many units'} end
if ttl <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end

local existing = redis.call('HMGET', record_key, 'r', 'f', 'l', 'x', 't', 'c')
if existing[1] then
  if existing[1] == resource and tonumber(existing[2]) == first and tonumber(existing[3]) == last then
    return {OUTCOME.OK, tonumber(existing[4]), tonumber(existing[5]), tonumber(existing[6])}
  end
  return {OUTCOME.HOLD_ID_REUSED, 'hold id names another hold'}
end

local holder, at = first_conflict(unit_root, resource, first, last, hold_id)
if holder then return {OUTCOME.CONFLICT, holder, at} end

local now = now_ms()
local expires_at = now + ttl
local token = redis.call('INCR', fence_key)
set_units(unit_root, resource, first, last, hold_id, expires_at)
redis.call('HSET', record_key, 'r', resource, 'f', first, 'l', last, 'x', expires_at,
  'c', now, 'n', 0, 't', token, 'o', owner)
redis.call('PEXPIREAT', record_key, expires_at)
return {OUTCOME.OK, expires_at, token, now}
