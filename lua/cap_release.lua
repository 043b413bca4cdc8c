--[[ Give back a hold's cap slot (cancel, expiry, commit, or compensation of a failed place).
  KEYS[1] <prefix>{sg:p:<partner>}:holds   -- sorted set: hold id scored by its expiry in ms
  KEYS[2] <prefix>{sg:p:<partner>}:rep     -- reputation hash (placed, committed)
  ARGV[1] hold id
  ARGV[2] why: 'released' (cancel, expiry), 'committed' (counts a commit toward reputation)
          or 'not_placed' (compensation: the hold never landed, so its acquisition no longer
          counts as placed)
  Returns: {1, removed (1 | 0)}; reputation changes only when the entry was removed, so a
           retried release never counts twice
  Errors (negative integers): -2 INVALID (+ reason)
]]
--@include @outcomes
--@include lib/cap_keep_until_last.lua

local holds_key, rep_key = KEYS[1], KEYS[2]
local hold_id, why = ARGV[1], ARGV[2]
if why ~= 'released' and why ~= 'committed' and why ~= 'not_placed' then
  return {OUTCOME.INVALID, 'unknown release reason'}
end

local removed = redis.call('ZREM', holds_key, hold_id)
if removed == 1 then
  if why == 'committed' then
    redis.call('HINCRBY', rep_key, 'committed', 1)
  elseif why == 'not_placed' then
    redis.call('HINCRBY', rep_key, 'placed', -1)
  end
  cap_keep_until_last(holds_key)
end
return {OUTCOME.OK, removed}
