--[[ Take one of a partner's live-hold slots for a hold, unless the partner is at its cap.
  KEYS[1] <prefix>{sg:p:<partner>}:holds   -- sorted set: hold id scored by its expiry in ms
  KEYS[2] <prefix>{sg:p:<partner>}:rep     -- reputation hash (placed, committed)
  ARGV[1] hold id
  ARGV[2] expires_at_ms (server clock, e.g. a hold's expiry), or 0 to use ARGV[3]
  ARGV[3] ttl in ms from the server's now (a provisional entry taken before the hold exists)
  ARGV[4] max live holds of the partner (0 = unlimited: counted, never refused)
  Returns: {1, live_holds_after, first_add (1 | 0)}; acquiring an id that already holds a
           slot only moves its expiry (a retry is never refused and never counted twice)
  Errors (negative integers): -13 CAP_EXCEEDED (+ retry_after_ms until the earliest entry
           expires), -2 INVALID (+ reason)
]]
--@include @outcomes
--@include lib/now_ms.lua
--@include lib/cap_prune.lua
--@include lib/cap_keep_until_last.lua

local holds_key, rep_key = KEYS[1], KEYS[2]
local hold_id = ARGV[1]
local expires_at, ttl, max = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

if not hold_id or hold_id == '' then return {OUTCOME.INVALID, 'empty hold id'} end
if not expires_at or not ttl or not max then return {OUTCOME.INVALID, 'non-numeric argument'} end
if max < 0 then return {OUTCOME.INVALID, 'negative cap'} end

local now = now_ms()
if expires_at == 0 then
  if ttl <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end
  expires_at = now + ttl
end
if expires_at < now then return {OUTCOME.INVALID, 'expiry in the past'} end

cap_prune(holds_key, now)
local known = redis.call('ZSCORE', holds_key, hold_id)
if not known and max > 0 then
  local live = redis.call('ZCARD', holds_key)
  if live >= max then
    local earliest = redis.call('ZRANGE', holds_key, 0, 0, 'WITHSCORES')
    return {OUTCOME.CAP_EXCEEDED, tonumber(earliest[2]) - now + 1}
  end
end

redis.call('ZADD', holds_key, expires_at, hold_id)
cap_keep_until_last(holds_key)
if not known then
  redis.call('HINCRBY', rep_key, 'placed', 1)
end
return {OUTCOME.OK, redis.call('ZCARD', holds_key), known and 0 or 1}
