--[[ Release a hold: free every unit it still owns and drop its record.
  KEYS[1] <prefix>{sg:<shard>}:u:            unit root
  KEYS[2] <prefix>{sg:<shard>}:h:<hold id>   hold record
  ARGV[1] hold id
  ARGV[2] fence token issued with the hold (proves the caller owns it)
  Returns: {1}
  Errors (negative integers): -4 NOT_FOUND (no such live hold), -5 NOT_OWNER (wrong token)
]]
--@include @outcomes
--@include lib/free_units.lua

local unit_root, record_key = KEYS[1], KEYS[2]
local hold_id, token = ARGV[1], ARGV[2]

local h = redis.call('HMGET', record_key, 'r', 'f', 'l', 't')
if not h[1] then return {OUTCOME.NOT_FOUND} end
if h[4] ~= token then return {OUTCOME.NOT_OWNER} end

free_units(unit_root, h[1], tonumber(h[2]), tonumber(h[3]), hold_id)
redis.call('DEL', record_key)
return {OUTCOME.OK}
