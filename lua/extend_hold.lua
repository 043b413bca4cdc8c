--[[ Extend a live hold to now + ttl, bounded by a max total hold time and a max count.
  KEYS[1] <prefix>{sg:<shard>}:u:            unit root
  KEYS[2] <prefix>{sg:<shard>}:h:<hold id>   hold record
  ARGV[1] hold id
  ARGV[2] fence token issued with the hold
  ARGV[3] ttl in ms from now
  ARGV[4] max total hold time in ms, counted from creation
  ARGV[5] max number of extensions
  Returns: {1, expires_at_ms, extensions_so_far}
  Errors (negative integers): -2 INVALID, -4 NOT_FOUND, -5 NOT_OWNER, -6 EXTENSION_LIMIT,
           -7 MAX_DURATION
]]
--@include @outcomes
--@include lib/now_ms.lua
--@include lib/owns_all.lua
--@include lib/set_units.lua

local unit_root, record_key = KEYS[1], KEYS[2]
local hold_id, token = ARGV[1], ARGV[2]
local ttl, max_total, max_ext = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if not ttl or ttl <= 0 or not max_total or not max_ext then return {OUTCOME.INVALID, 'bad argument'} end

local h = redis.call('HMGET', record_key, 'r', 'f', 'l', 'x', 'c', 'n', 't')
if not h[1] then return {OUTCOME.NOT_FOUND} end
if h[7] ~= token then return {OUTCOME.NOT_OWNER} end
local resource, first, last = h[1], tonumber(h[2]), tonumber(h[3])
local expires_at, created_at, n = tonumber(h[4]), tonumber(h[5]), tonumber(h[6])
if n >= max_ext then return {OUTCOME.EXTENSION_LIMIT} end

local now = now_ms()
local new_expiry = math.max(expires_at, now + ttl)
if new_expiry - created_at > max_total then return {OUTCOME.MAX_DURATION} end
if not owns_all(unit_root, resource, first, last, hold_id) then return {OUTCOME.NOT_FOUND} end

set_units(unit_root, resource, first, last, hold_id, new_expiry)
redis.call('HSET', record_key, 'x', new_expiry, 'n', n + 1)
redis.call('PEXPIREAT', record_key, new_expiry)
return {OUTCOME.OK, new_expiry, n + 1}
