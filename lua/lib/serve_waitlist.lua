--@include lib/first_conflict.lua
--@include lib/load_reservation.lua
--@include lib/emit_transition.lua
--@include lib/walk_auto_steps.lua
--@include lib/settle.lua
-- Waitlist handoff (issue 16). Called by every script that frees units of `resource` in
-- [first, last] (expiry, cancel, any failure, a move) and by a direct create before it takes
-- units, so the waiting entries get the units in the SAME script that frees them and no third
-- party can slip in between: for each live waiting entry that overlaps [first, last], oldest
-- first (FIFO: the shard's sequence), whose whole slot is free now, place its hold.
--
-- Keys are derived from the unit root (`<prefix>{sg:S}:u:` -> `<prefix>{sg:S}:`) as unit keys
-- are: the appended parts never hold a brace, so every key keeps the root's hash tag:
--   <root>wli:<resource>          zset: the resource's slots with waiting entries,
--                                 member '<first>:<last>' (units), scored by last unit
--   <root>wlq:<resource>:<f>:<l>  zset: the slot's entries, scored by the shard's sequence
--                                 (FIFO per slot)
--   <root>wl:<entry id>           hash: the entry (st, p, vd, rs, rq, s, e, f, l, bs, be, cr,
--                                 pr, md, c, x expiry, q sequence, th/tc/ta the stage TTLs and
--                                 rt the record retention its hold gets: the settings when the
--                                 entry was made, so any script that frees units can serve
--                                 it; r reservation id once fulfilled)
--   <root>r:/rh:<rsv id>          the new reservation, its id derived from the entry's
--                                 ('wl_<shard>_<ulid>' -> 'rsv_<shard>_<ulid>'): one entry,
--                                 one hold
--   <root>fence:<resource>, <root>ready
-- For each slot overlapping [first, last] (at most WAITLIST_SCAN_MAX slots, those ending
-- soonest after `first`), the oldest live entry is the candidate; finished or expired entries
-- met at a queue's head leave it (at most WAITLIST_DROP_MAX per call). Candidates are served
-- oldest first when their whole slot is free, so among waiting partners the first come gets
-- the slot, and an entry whose slot is still partly held waits without blocking others.
-- Nothing is served on a shard whose booked markers are not rehydrated.
-- Returns a flat list {reservation id, partner id, entry id, deadline, ...} of the holds
-- placed (the caller moves each entry's cap slot to its hold: lua/cap_waitlist.lua).
local WAITLIST_SCAN_MAX = 64
local WAITLIST_DROP_MAX = 256

local function place_from_waitlist(root, unit_root, events_key, deadlines_key, eid, now)
  local entry_key = root .. 'wl:' .. eid
  local rid = 'rsv' .. eid:sub(3)
  local record_key, history_key = root .. 'r:' .. rid, root .. 'rh:' .. rid
  if redis.call('EXISTS', record_key) == 1 then
    -- Its hold exists already (it cannot: the entry is marked in the same script); never twice.
    redis.call('HSET', entry_key, 'st', 'fulfilled', 'r', rid)
    return nil
  end
  local w = redis.call('HMGET', entry_key, 'p', 'vd', 'rs', 'rq', 's', 'e', 'f', 'l', 'bs',
    'be', 'cr', 'pr', 'md', 'th', 'tc', 'ta', 'rt')
  local ttl = {hold = tonumber(w[14]), confirmed = tonumber(w[15]), authorized = tonumber(w[16])}
  local retention = tonumber(w[17])
  -- Mirrors lua/create_reservation.lua: the walk the vendor's policy allows, one entry.
  local path = walk_auto_steps({'INTENT_CREATED'}, w[11] == '1', w[12] == '1')
  local deadline = now + ttl.hold
  for _, state in ipairs(path) do
    if STAGE_TTL[state] then deadline = now + ttl[STAGE_TTL[state]] end
  end
  local token = redis.call('INCR', root .. 'fence:' .. w[3])
  local final, version = path[#path], #path - 1
  redis.call('HSET', record_key, 'st', final, 'v', version, 'p', w[1], 'vd', w[2],
    'rs', w[3], 'rq', w[4], 's', w[5], 'e', w[6], 'f', w[7], 'l', w[8], 'bs', w[9],
    'be', w[10], 'c', now, 'dl', deadline, 'cr', w[11], 'pr', w[12], 'x', 0, 't', token,
    'md', w[13], 'ik', '', 'og', 'waitlist', 'wl', eid)
  local rec = load_reservation(record_key, rid)
  emit_transition(events_key, history_key, rec, path[1], {unpack(path, 2)}, version, 'system',
    'waitlist', w[13], '', now, deadline, true, {'origin', 'waitlist', 'waitlistEntryId', eid})
  settle(unit_root, record_key, history_key, deadlines_key, rec, final, deadline, retention, 0,
    now)
  redis.call('HSET', entry_key, 'st', 'fulfilled', 'r', rid, 'ft', now)
  return rid, w[1], deadline
end

-- Drop `member` from a slot's queue, and the slot from the index once its queue is empty.
local function waitlist_dequeue(index_key, queue_key, slot, member)
  redis.call('ZREM', queue_key, member)
  if redis.call('ZCARD', queue_key) == 0 then redis.call('ZREM', index_key, slot) end
end

local function serve_waitlist(unit_root, events_key, deadlines_key, resource, first, last, now)
  local served = {}
  local root = unit_root:sub(1, -3)
  local index_key = root .. 'wli:' .. resource
  if redis.call('EXISTS', index_key) == 0 then return served end
  if redis.call('EXISTS', root .. 'ready') == 0 then return served end
  local slots = redis.call('ZRANGEBYSCORE', index_key, first, '+inf', 'LIMIT', 0,
    WAITLIST_SCAN_MAX)
  local candidates, dropped = {}, 0
  for _, slot in ipairs(slots) do
    local sep = slot:find(':', 1, true)
    local f, l = tonumber(slot:sub(1, sep - 1)), tonumber(slot:sub(sep + 1))
    if f <= last then
      local queue_key = root .. 'wlq:' .. resource .. ':' .. slot
      while dropped < WAITLIST_DROP_MAX do
        local head = redis.call('ZRANGE', queue_key, 0, 0, 'WITHSCORES')
        if not head[1] then
          redis.call('ZREM', index_key, slot)
          break
        end
        local entry_key = root .. 'wl:' .. head[1]
        local e = redis.call('HMGET', entry_key, 'st', 'x')
        if e[1] == 'waiting' and tonumber(e[2]) > now then
          candidates[#candidates + 1] = {head[1], tonumber(head[2]), f, l, queue_key, slot}
          break
        end
        if e[1] == 'waiting' then redis.call('HSET', entry_key, 'st', 'expired') end
        waitlist_dequeue(index_key, queue_key, slot, head[1])
        dropped = dropped + 1
      end
    end
  end
  table.sort(candidates, function(a, b) return a[2] < b[2] end)
  for _, c in ipairs(candidates) do
    if not first_conflict(unit_root, resource, c[3], c[4], '') then
      waitlist_dequeue(index_key, c[5], c[6], c[1])
      local rid, partner, deadline = place_from_waitlist(root, unit_root, events_key,
        deadlines_key, c[1], now)
      if rid then
        local n = #served
        served[n + 1] = rid; served[n + 2] = partner; served[n + 3] = c[1]
        served[n + 4] = deadline
      end
    end
  end
  return served
end
