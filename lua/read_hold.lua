--[[ Read a live hold.
  KEYS[1] <prefix>{sg:<shard>}:h:<hold id>   hold record
  Returns: {1, resource, first_unit, last_unit, expires_at_ms, created_at_ms, extensions,
            fence_token, owner}
  Errors (negative integers): -4 NOT_FOUND
]]
--@include @outcomes
local h = redis.call('HMGET', KEYS[1], 'r', 'f', 'l', 'x', 'c', 'n', 't', 'o')
if not h[1] then return {OUTCOME.NOT_FOUND} end
return {OUTCOME.OK, h[1], tonumber(h[2]), tonumber(h[3]), tonumber(h[4]), tonumber(h[5]),
  tonumber(h[6]), tonumber(h[7]), h[8]}
