--[[ Drop a request's in-progress claim on an idempotency key, so the key can be retried.
  (Used when the request failed in a way the client may retry.)
  KEYS[1] <prefix>{sg:p:<partner>}:idem:<key>   -- hash: s (p = in progress | d = done), fp, st, b
  ARGV[1] request fingerprint of the claim
  Returns: {1, removed (1 | 0)}; a completed record or another request's claim is never removed
  Errors (negative integers): none
]]
--@include @outcomes

local key = KEYS[1]
local rec = redis.call('HMGET', key, 's', 'fp')
if rec[1] == 'p' and rec[2] == ARGV[1] then
  redis.call('DEL', key)
  return {OUTCOME.OK, 1}
end
return {OUTCOME.OK, 0}
