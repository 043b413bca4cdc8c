--[[ Read a partner's live holds and reputation counters (no writes).
  KEYS[1] <prefix>{sg:p:<partner>}:holds   -- sorted set: hold id scored by its expiry in ms
  KEYS[2] <prefix>{sg:p:<partner>}:rep     -- reputation hash (placed, committed)
  Returns: {1, live_holds, placed, committed}
  Errors (negative integers): none
]]
--@include @outcomes
--@include lib/now_ms.lua

local live = redis.call('ZCOUNT', KEYS[1], now_ms(), '+inf')
local rep = redis.call('HMGET', KEYS[2], 'placed', 'committed')
return {OUTCOME.OK, live, tonumber(rep[1] or '0'), tonumber(rep[2] or '0')}
