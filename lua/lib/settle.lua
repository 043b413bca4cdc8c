--@include lib/set_units.lua
--@include lib/free_units.lua
--@include lib/items_of.lua
-- Make units, record, history and the deadline index agree with the state the reservation
-- stops in: live states expire with their deadline; COMMIT_IN_PROGRESS pins the units (no
-- expiry) until the worker ends the commit; COMMITTED turns them into booked markers that
-- outlive the slot; every other terminal state frees them at once.
local function settle(unit_root, record_key, history_key, deadlines_key, rec, state,
                      deadline, retention, marker_retention, now)
  local items = items_of(rec)
  local booked_until = math.max(tonumber(rec.be) + marker_retention, now + marker_retention)
  if state == 'COMMITTED' and rec.it and rec.it ~= '' then
    for _, item in ipairs(items) do  -- markers outlive the latest block of the items
      booked_until = math.max(booked_until, item.be + marker_retention)
    end
  end
  for _, item in ipairs(items) do
    local rs, f, l = item.rs, item.f, item.l
    if state == 'COMMITTED' then
      set_units(unit_root, rs, f, l, BOOKED_PREFIX .. rec.id, booked_until)
    elseif state == 'COMMIT_IN_PROGRESS' then
      set_units(unit_root, rs, f, l, rec.id, 0)
    elseif TERMINAL[state] then
      free_units(unit_root, rs, f, l, rec.id)
    else
      set_units(unit_root, rs, f, l, rec.id, deadline)
    end
  end
  if TERMINAL[state] then
    redis.call('ZREM', deadlines_key, rec.id)
    redis.call('PEXPIREAT', record_key, now + retention)
    redis.call('PEXPIREAT', history_key, now + retention)
  elseif state == 'COMMIT_IN_PROGRESS' then
    -- Scored by the commit deadline so the reaper can report a commit that never ends.
    redis.call('ZADD', deadlines_key, deadline, rec.id)
    redis.call('PERSIST', record_key)
    redis.call('PERSIST', history_key)
  else
    -- A live record outlives its hold by the retention, even if no reaper ever runs.
    redis.call('ZADD', deadlines_key, deadline, rec.id)
    redis.call('PEXPIREAT', record_key, deadline + retention)
    redis.call('PEXPIREAT', history_key, deadline + retention)
  end
end
