--[[ Raise a resource's fencing counter to at least a token already committed (issue 15).
  After Redis lost its data the counter would start again at 1, and a new commit's token
  would be older than bookings already in Postgres; rehydration raises it first.
  KEYS[1] <prefix>{sg:<shard>}:fence:<resource>   the resource's fencing counter
  ARGV[1] the newest token committed for the resource (bookings.fence_token)
  Returns: {1, counter after the call}; -2 INVALID (+ reason) for a non-integer token
]]
--@include @outcomes
local token = tonumber(ARGV[1])
if not token or token < 0 or token % 1 ~= 0 then return {OUTCOME.INVALID, 'token must be a non-negative integer'} end
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if current < token then
  redis.call('SET', KEYS[1], token)
  current = token
end
return {OUTCOME.OK, current}
