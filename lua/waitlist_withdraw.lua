--[[ Withdraw a waiting waitlist entry (issue 16): it leaves the resource's waitlist at once.
  KEYS[1] <prefix>{sg:<shard>}:wl:<entry id>    the entry (hash)
  KEYS[2] <prefix>{sg:<shard>}:wli:<resource>   the resource's slots with waiting entries
  KEYS[3] <prefix>{sg:<shard>}:wlq:<resource>:<first>:<last>   the entry's slot queue (an
          entry on a resource group: its first member's; it leaves every member's queue, whose
          keys are derived from the entry key's tag: <tag>:wli:<member>,
          <tag>:wlq:<member>:<first>:<last>)
  ARGV[1] entry id
  ARGV[2] tenancy: the caller's partner scope ('' = any); another partner's entry is NOT_FOUND
  Returns: {1, 'withdrawn', expires_at_ms, created_at_ms, partner id}
  Errors (negative integers): -4 NOT_FOUND, -39 WAITLIST_NOT_WAITING (+ state: fulfilled,
           expired, withdrawn)
]]
--@include @outcomes
--@include lib/now_ms.lua

local entry_key, index_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[1]
local e = redis.call('HMGET', entry_key, 'st', 'p', 'x', 'c', 'f', 'l', 'gc')
local function leave(q_key, i_key, slot)
  redis.call('ZREM', q_key, id)
  if redis.call('ZCARD', q_key) == 0 then redis.call('ZREM', i_key, slot) end
end
local function dequeue()
  leave(queue_key, index_key, e[5] .. ':' .. e[6])
  if e[7] and e[7] ~= '' then
    local root = entry_key:sub(1, #entry_key - #('wl:' .. id))
    for _, m in ipairs(cjson.decode(e[7])) do
      local slot = tonumber(m[2]) .. ':' .. tonumber(m[3])
      leave(root .. 'wlq:' .. m[1] .. ':' .. slot, root .. 'wli:' .. m[1], slot)
    end
  end
end
if not e[1] then return {OUTCOME.NOT_FOUND} end
if ARGV[2] ~= '' and e[2] ~= ARGV[2] then return {OUTCOME.NOT_FOUND} end
if e[1] ~= 'waiting' then return {OUTCOME.WAITLIST_NOT_WAITING, e[1]} end
if tonumber(e[3]) <= now_ms() then
  -- Expired in fact: record it (as the handoff would) and refuse.
  redis.call('HSET', entry_key, 'st', 'expired')
  dequeue()
  return {OUTCOME.WAITLIST_NOT_WAITING, 'expired'}
end
redis.call('HSET', entry_key, 'st', 'withdrawn', 'wd', now_ms())
dequeue()
return {OUTCOME.OK, 'withdrawn', tonumber(e[3]), tonumber(e[4]), e[2]}
