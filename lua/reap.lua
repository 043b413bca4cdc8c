--[[ Expire a shard's overdue reservations in one call (the reaper, issue 14).
  Each due reservation gets exactly the writes of lua/transition.lua's 'expire'
  (lua/lib/expire_record.lua): one commit-queue entry, history, units freed, its resources'
  waitlists served. Atomic per call, so reapers racing over the same shard expire each
  reservation once. Entries that stay due (a COMMIT_IN_PROGRESS scored by its commit
  deadline, read by reconciliation; a record whose deadline is later than its score) are
  skipped; entries of records that are gone or already terminal leave the index.
  KEYS[1] <prefix>{sg:<shard>}:u:          unit root; the shard's tag for the derived keys
  KEYS[2] <prefix>{sg:<shard>}:events      the shard's commit-queue stream
  KEYS[3] <prefix>{sg:<shard>}:deadlines   deadline index
  ARGV[1] most reservations expired by this call
  ARGV[2] record retention ms after a terminal state
  ARGV[3] booked marker retention ms after the booking's end
  Derived keys: <tag>:r:<id> and <tag>:rh:<id> (record, history) of each due id, and what
  lua/lib/serve_waitlist.lua derives, all under the unit root's hash tag.
  Returns: {1, now_ms, next deadline ms ('' when the index has none after now), more (1 when
           the limit stopped the call with due reservations left, else 0),
           {id, state, version, deadline, partner id, {handoff reservation id, partner id,
            entry id, deadline, ...}}, ...}: one list per reservation expired now
  Errors (negative integers): -2 INVALID
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/load_reservation.lua
--@include lib/expire_record.lua

local unit_root, events_key, deadlines_key = KEYS[1], KEYS[2], KEYS[3]
local limit, retention = tonumber(ARGV[1]), tonumber(ARGV[2])
local marker_retention = tonumber(ARGV[3])
if not limit or limit < 1 or not retention or not marker_retention then
  return {OUTCOME.INVALID, 'non-numeric argument'}
end
local tag = string.sub(unit_root, 1, -4)
local now = now_ms()
local out = {OUTCOME.OK, now, '', 0}
local expired, skipped = 0, 0
while expired < limit do
  local due = redis.call('ZRANGEBYSCORE', deadlines_key, '-inf', now, 'LIMIT', skipped,
    limit - expired)
  if #due == 0 then break end
  for _, id in ipairs(due) do
    local record_key = tag .. ':r:' .. id
    local rec = load_reservation(record_key, id)
    if not rec or TERMINAL[rec.st] then
      redis.call('ZREM', deadlines_key, id)
    elseif not PRE_COMMIT[rec.st] or rec.dl > now then
      skipped = skipped + 1
    else
      local final, v, handoffs = expire_record(unit_root, events_key, deadlines_key,
        record_key, tag .. ':rh:' .. id, rec, now, retention, marker_retention)
      out[#out + 1] = {id, final, v, rec.dl, rec.p, handoffs}
      expired = expired + 1
    end
  end
end
if expired >= limit and #redis.call('ZRANGEBYSCORE', deadlines_key, '-inf', now, 'LIMIT',
    skipped, 1) > 0 then
  out[4] = 1
end
local following = redis.call('ZRANGEBYSCORE', deadlines_key, '(' .. now, '+inf',
  'WITHSCORES', 'LIMIT', 0, 1)
if #following > 0 then out[3] = following[2] end
return out
