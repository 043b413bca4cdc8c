--[[ Store the response of a request that claimed an idempotency key, for later replay.
  KEYS[1] <prefix>{sg:p:<partner>}:idem:<key>   -- hash: s (p = in progress | d = done), fp, st, b
  KEYS[2] <prefix>{sg:p:<partner>}:idem-refused -- zset: the partner's refused records by expiry
  ARGV[1] request fingerprint (sha256 hex of the canonical request)
  ARGV[2] response status (HTTP status code)
  ARGV[3] response body (text)
  ARGV[4] how long the record is kept, in ms (0 = no expiry; for a refusal, 0 = not kept)
  ARGV[5] 1 when the response is a refusal (a 4xx): kept ARGV[4] ms and counted in KEYS[2]
  ARGV[6] refused records kept per partner (0 = no cap); past it the oldest are deleted
  Returns: {1, stored (1 | 0)}; 0 when the same request had already completed (the first
           stored response wins, so a replay is always the same answer). A claim whose lock
           expired is still completed: the work was done, and its retries should replay it.
  Errors (negative integers): -14 IDEMPOTENCY_MISMATCH (the key now belongs to another
           request), -2 INVALID (+ reason)
]]
--@include @outcomes
--@include lib/now_ms.lua

-- Refused requests (a 409 conflict, a 422) cost the client nothing, so a partner could leave
-- any number of them behind: their records live a short while and at most ARGV[6] of them
-- per partner are kept. The index names each record by its full key, which carries the
-- partner's hash tag, so every key deleted here lives in this call's slot.
local key, index = KEYS[1], KEYS[2]
local fp, status, body, ttl_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local refused, cap = ARGV[5] == '1', tonumber(ARGV[6] or '0')
if not fp or fp == '' then return {OUTCOME.INVALID, 'empty fingerprint'} end
if not status or status ~= math.floor(status) then return {OUTCOME.INVALID, 'bad status'} end
if not body then return {OUTCOME.INVALID, 'missing body'} end
if not ttl_ms or ttl_ms < 0 then return {OUTCOME.INVALID, 'bad ttl ms'} end
if not cap or cap < 0 then return {OUTCOME.INVALID, 'bad cap'} end

local rec = redis.call('HMGET', key, 's', 'fp')
if rec[1] and rec[2] ~= fp then return {OUTCOME.IDEMPOTENCY_MISMATCH} end
if rec[1] == 'd' then return {OUTCOME.OK, 0} end

if refused then
  if ttl_ms == 0 then
    redis.call('DEL', key)
    return {OUTCOME.OK, 1}
  end
  local now = now_ms()
  redis.call('HSET', key, 's', 'd', 'fp', fp, 'st', status, 'b', body)
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  redis.call('ZADD', index, now + ttl_ms, key)
  if cap > 0 then
    local excess = redis.call('ZCARD', index) - cap
    if excess > 0 then
      local oldest = redis.call('ZPOPMIN', index, excess)
      for i = 1, #oldest, 2 do
        redis.call('DEL', oldest[i])
      end
    end
  end
  redis.call('PEXPIRE', index, ttl_ms)
  return {OUTCOME.OK, 1}
end

redis.call('HSET', key, 's', 'd', 'fp', fp, 'st', status, 'b', body)
if ttl_ms > 0 then
  redis.call('PEXPIRE', key, ttl_ms)
else
  redis.call('PERSIST', key)
end
return {OUTCOME.OK, 1}
