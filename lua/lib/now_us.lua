-- The server clock in whole microseconds (about 1.7e15: exact in a Lua double, < 2^53).
-- Scripts never take the time from the caller.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
