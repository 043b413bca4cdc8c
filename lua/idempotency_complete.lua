--[[ Store the response of a request that claimed an idempotency key, for later replay.
  KEYS[1] <prefix>{sg:p:<partner>}:idem:<key>   -- hash: s (p = in progress | d = done), fp, st, b
  ARGV[1] request fingerprint (sha256 hex of the canonical request)
  ARGV[2] response status (HTTP status code)
  ARGV[3] response body (text)
  ARGV[4] how long the record is kept, in ms (0 = no expiry)
  Returns: {1, stored (1 | 0)}; 0 when the same request had already completed (the first
           stored response wins, so a replay is always the same answer). A claim whose lock
           expired is still completed: the work was done, and its retries should replay it.
  Errors (negative integers): -14 IDEMPOTENCY_MISMATCH (the key now belongs to another
           request), -2 INVALID (+ reason)
]]
--@include @outcomes

local key = KEYS[1]
local fp, status, body, ttl_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if not fp or fp == '' then return {OUTCOME.INVALID, 'empty fingerprint'} end
if not status or status ~= math.floor(status) then return {OUTCOME.INVALID, 'bad status'} end
if not body then return {OUTCOME.INVALID, 'missing body'} end
if not ttl_ms or ttl_ms < 0 then return {OUTCOME.INVALID, 'bad ttl ms'} end

local rec = redis.call('HMGET', key, 's', 'fp')
if rec[1] and rec[2] ~= fp then return {OUTCOME.IDEMPOTENCY_MISMATCH} end
if rec[1] == 'd' then return {OUTCOME.OK, 0} end

redis.call('HSET', key, 's', 'd', 'fp', fp, 'st', status, 'b', body)
if ttl_ms > 0 then
  redis.call('PEXPIRE', key, ttl_ms)
else
  redis.call('PERSIST', key)
end
return {OUTCOME.OK, 1}
