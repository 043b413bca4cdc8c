--[[ Read a waitlist entry (issue 16) with the server's clock, so an entry past its expiry
  reads as expired although nothing has marked it yet. Writes nothing.
  KEYS[1] <prefix>{sg:<shard>}:wl:<entry id>    the entry (hash)
  Returns: {1, {field, value, ...}, now_ms}
  Errors (negative integers): -4 NOT_FOUND
]]
--@include @outcomes
--@include lib/now_ms.lua

local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {OUTCOME.NOT_FOUND} end
return {OUTCOME.OK, fields, now_ms()}
