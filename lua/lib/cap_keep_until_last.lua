-- Let the cap set expire with its last entry, so an idle partner leaves nothing behind.
local function cap_keep_until_last(holds_key)
  local last = redis.call('ZRANGE', holds_key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', holds_key, tonumber(last[2]) + 1)
  end
end
