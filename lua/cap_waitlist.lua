--[[ A waitlist entry's slot in its partner's live-hold cap (issue 16): an entry counts as a
  live hold from the moment it waits, and its slot passes to the hold it becomes.
  KEYS[1] <prefix>{sg:p:<partner>}:holds   -- sorted set: hold / entry id scored by expiry ms
  KEYS[2] <prefix>{sg:p:<partner>}:rep     -- reputation hash (placed, committed)
  ARGV[1] operation: 'acquire' (the entry starts waiting: refused at the cap), 'fulfil' (the
          entry became a hold: its slot passes to the reservation, never refused, counted
          as placed once), 'release' (withdrawn, or the entry never landed)
  ARGV[2] waitlist entry id
  ARGV[3] expires at ms (acquire: the entry's expiry; fulfil: the hold's deadline; release: 0)
  ARGV[4] reservation id (fulfil only, else '')
  ARGV[5] max live holds of the partner (acquire only; 0 = unlimited: counted, never refused)
  Returns: {1, live entries after}; repeating an operation changes nothing more
  Errors (negative integers): -13 CAP_EXCEEDED (+ retry_after_ms until the earliest entry
           expires), -2 INVALID (+ reason)
]]
--@include @outcomes
--@include lib/now_ms.lua
--@include lib/cap_prune.lua
--@include lib/cap_keep_until_last.lua

local holds_key, rep_key = KEYS[1], KEYS[2]
local op, entry, rid = ARGV[1], ARGV[2], ARGV[4]
local expires_at, max = tonumber(ARGV[3]), tonumber(ARGV[5])
if op ~= 'acquire' and op ~= 'fulfil' and op ~= 'release' then
  return {OUTCOME.INVALID, 'unknown operation'}
end
if not entry or entry == '' then return {OUTCOME.INVALID, 'empty entry id'} end
if not expires_at or not max or max < 0 then return {OUTCOME.INVALID, 'non-numeric argument'} end

local now = now_ms()
if op == 'release' then
  if redis.call('ZREM', holds_key, entry) == 1 then cap_keep_until_last(holds_key) end
  return {OUTCOME.OK, redis.call('ZCARD', holds_key)}
end
if expires_at <= now then
  if op == 'acquire' then return {OUTCOME.INVALID, 'expiry in the past'} end
  -- A hold already overdue: nothing to count any more.
  redis.call('ZREM', holds_key, entry)
  return {OUTCOME.OK, redis.call('ZCARD', holds_key)}
end
cap_prune(holds_key, now)
if op == 'acquire' then
  if not redis.call('ZSCORE', holds_key, entry) and max > 0
      and redis.call('ZCARD', holds_key) >= max then
    local earliest = redis.call('ZRANGE', holds_key, 0, 0, 'WITHSCORES')
    return {OUTCOME.CAP_EXCEEDED, tonumber(earliest[2]) - now + 1}
  end
  redis.call('ZADD', holds_key, expires_at, entry)
else
  if rid == '' then return {OUTCOME.INVALID, 'fulfil needs the reservation id'} end
  redis.call('ZREM', holds_key, entry)
  if not redis.call('ZSCORE', holds_key, rid) then
    redis.call('ZADD', holds_key, expires_at, rid)
    redis.call('HINCRBY', rep_key, 'placed', 1)
  end
end
cap_keep_until_last(holds_key)
return {OUTCOME.OK, redis.call('ZCARD', holds_key)}
