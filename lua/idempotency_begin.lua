--[[ Claim an idempotency key for a request, or answer what the key already holds.
  KEYS[1] <prefix>{sg:p:<partner>}:idem:<key>   -- hash: s (p = in progress | d = done), fp, st, b
  ARGV[1] request fingerprint (sha256 hex of the canonical request)
  ARGV[2] lock in ms: how long an in-progress claim blocks the key (0 = until complete/abandon)
  Returns: {1, 'proceed'} the key was free and is now claimed by this request;
           {1, 'replay', status, body} the same request already completed: replay its response
  Errors (negative integers): -14 IDEMPOTENCY_MISMATCH (the key was used for another request),
           -15 IDEMPOTENCY_IN_PROGRESS (+ retry_after_ms, -1 when the claim has no expiry),
           -2 INVALID (+ reason)
]]
--@include @outcomes

local key = KEYS[1]
local fp, lock_ms = ARGV[1], tonumber(ARGV[2])
if not fp or fp == '' then return {OUTCOME.INVALID, 'empty fingerprint'} end
if not lock_ms or lock_ms < 0 then return {OUTCOME.INVALID, 'bad lock ms'} end

local rec = redis.call('HMGET', key, 's', 'fp', 'st', 'b')
if not rec[1] then
  redis.call('HSET', key, 's', 'p', 'fp', fp)
  if lock_ms > 0 then redis.call('PEXPIRE', key, lock_ms) end
  return {OUTCOME.OK, 'proceed'}
end
if rec[2] ~= fp then return {OUTCOME.IDEMPOTENCY_MISMATCH} end
if rec[1] == 'd' then return {OUTCOME.OK, 'replay', tonumber(rec[3]), rec[4]} end
return {OUTCOME.IDEMPOTENCY_IN_PROGRESS, redis.call('PTTL', key)}
