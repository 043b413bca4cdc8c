--[[ Give back a hold's cap slot (cancel, expiry, commit, or compensation of a failed place).
  KEYS[1] <prefix>{sg:p:<partner>}:holds   -- sorted set: hold id scored by its expiry in ms
  KEYS[2] <prefix>{sg:p:<partner>}:rep     -- reputation hash (placed, committed)
  ARGV[1] hold id
  ARGV[2] 1 when the hold was committed (counts toward reputation), else 0
  Returns: {1, removed (1 | 0)}; `committed` is counted only when the entry was removed, so a
           retried release never counts a commit twice
  Errors (negative integers): none
]]
--@include lib/cap_keep_until_last.lua

local holds_key, rep_key = KEYS[1], KEYS[2]
local hold_id, committed = ARGV[1], ARGV[2] == '1'

local removed = redis.call('ZREM', holds_key, hold_id)
if removed == 1 then
  if committed then
    redis.call('HINCRBY', rep_key, 'committed', 1)
  end
  cap_keep_until_last(holds_key)
end
return {1, removed}
