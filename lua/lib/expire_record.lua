--@include lib/emit_transition.lua
--@include lib/settle.lua
--@include lib/serve_waitlist.lua
-- Expire a loaded, overdue, pre-commit reservation (the caller checked all three): its
-- state becomes EXPIRES_AS[state] (EXPIRED, or the vendor's timeout while the vendor is
-- awaited), one commit-queue entry and history entry record it, units and index settle,
-- and the units it frees serve their resources' waitlists (issue 16) in this same script.
-- Shared by lua/transition.lua (op 'expire') and lua/reap.lua (a shard's batch), so one
-- expiry is the same writes whoever asks. Returns the state, the version and the handoffs.
local function expire_record(unit_root, events_key, deadlines_key, record_key, history_key,
                             rec, now, retention, marker_retention)
  local from = rec.st
  local final = EXPIRES_AS[from]
  if not final or not EDGES[from][final] then error('lifecycle bug: expire ' .. from) end
  local v = rec.v + 1
  emit_transition(events_key, history_key, rec, from, {final}, v, 'timeout', 'deadline passed',
    '{}', '', now, '', false, nil)
  local fields = {'st', final, 'v', v, 'dl', rec.dl}
  if final:sub(1, 7) == 'FAILED_' then
    fields[#fields + 1] = 'fr'; fields[#fields + 1] = 'deadline passed'
  end
  redis.call('HSET', record_key, unpack(fields))
  settle(unit_root, record_key, history_key, deadlines_key, rec, final, rec.dl, retention,
    marker_retention, now)
  -- every item's units are free: each serves its waitlist first (lib/serve_waitlist.lua)
  return final, v, serve_waitlists(unit_root, events_key, deadlines_key, items_of(rec), now)
end
