--[[ Move a hold's cap entry to the hold's new expiry (after extend, or once placed).
  KEYS[1] <prefix>{sg:p:<partner>}:holds   -- sorted set: hold id scored by its expiry in ms
  ARGV[1] hold id
  ARGV[2] expires_at_ms (server clock, as the hold scripts report it)
  Returns: {1, expires_at_ms}
  Errors (negative integers): -4 NOT_FOUND (the id holds no live slot: released or expired;
           touch never re-adds one, so it cannot bypass the cap), -2 INVALID (+ reason)
]]
--@include @outcomes
--@include lib/now_ms.lua
--@include lib/cap_prune.lua
--@include lib/cap_keep_until_last.lua

local holds_key = KEYS[1]
local hold_id, expires_at = ARGV[1], tonumber(ARGV[2])
if not expires_at or expires_at <= 0 then return {OUTCOME.INVALID, 'bad expiry'} end

local now = now_ms()
cap_prune(holds_key, now)
if not redis.call('ZSCORE', holds_key, hold_id) then return {OUTCOME.NOT_FOUND} end
redis.call('ZADD', holds_key, 'XX', expires_at, hold_id)
cap_prune(holds_key, now)
cap_keep_until_last(holds_key)
return {OUTCOME.OK, expires_at}
