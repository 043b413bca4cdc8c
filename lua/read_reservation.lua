--[[ Read a reservation record and its history in one round trip.
  KEYS[1] <prefix>{sg:<shard>}:r:<id>    reservation record
  KEYS[2] <prefix>{sg:<shard>}:rh:<id>   reservation history
  Returns: {1, {field, value, ...}, {history entry JSON, ...}}
  Errors (negative integers): -4 NOT_FOUND
]]
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {-4} end
return {1, fields, redis.call('LRANGE', KEYS[2], 0, -1)}
