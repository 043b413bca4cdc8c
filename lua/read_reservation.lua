--[[ Read a reservation record and its history in one round trip.
  KEYS[1] <prefix>{sg:<shard>}:r:<id>    reservation record
  KEYS[2] <prefix>{sg:<shard>}:rh:<id>   reservation history
  Returns: {1, {field, value, ...}, {history entry JSON, ...}}
  Errors (negative integers): -4 NOT_FOUND
]]
--@include @outcomes
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {OUTCOME.NOT_FOUND} end
return {OUTCOME.OK, fields, redis.call('LRANGE', KEYS[2], 0, -1)}
