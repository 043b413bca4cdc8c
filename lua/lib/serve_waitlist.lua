--@include lib/first_conflict.lua
--@include lib/choose_member.lua
--@include lib/place_reservation.lua
-- Waitlist handoff (issue 16). Called by every script that frees units of `resource` in
-- [first, last] (expiry, cancel, any failure, a move) and by every create before it takes
-- units (direct, pooled: each candidate member, multi-resource: each item), so the waiting
-- entries get the units in the SAME script that frees them and no third party can slip in
-- between: for each live waiting entry that overlaps [first, last], oldest first (FIFO: the
-- shard's sequence), that can be placed now, place its hold.
--
-- An entry waits for one resource, or for any member of a resource group (an entry on a
-- group: `g`, its members in the group's strategy order `gc`, choice `ch`, best-fit window
-- `gw`). A group entry is queued on EVERY member, in the member's queue of its own units,
-- beside the entries naming that resource: one queue, one sequence, so a resource's own
-- entries and its groups' entries are served in the order they joined (FIFO across both).
-- A resource's entry is placed when its whole slot is free on the resource; a group's entry
-- on the member lib/choose_member.lua picks (first free in order, or best fit), which may be
-- another member than the one that freed (one whose hold lapsed before the reaper ran).
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
--                                 it; r reservation id once fulfilled; g/gc/ch/gw for a
--                                 group, whose rs/f/l/bs/be name the member once fulfilled)
--   <root>r:/rh:<rsv id>          the new reservation, its id derived from the entry's
--                                 ('wl_<shard>_<ulid>' -> 'rsv_<shard>_<ulid>'): one entry,
--                                 one hold
--   <root>fence:<resource>, <root>ready
-- For each slot overlapping [first, last] (at most WAITLIST_SCAN_MAX slots, those ending
-- soonest after `first`), the oldest live entry is the candidate; finished or expired entries
-- met at a queue's head leave it (at most WAITLIST_DROP_MAX per call). Candidates are served
-- oldest first when they can be placed, so among waiting partners the first come gets the
-- slot, and an entry whose slot is still partly held waits without blocking others. A group
-- entry placed on another member leaves this resource's units free: another pass serves the
-- entries behind it (at most WAITLIST_PASSES).
-- Nothing is served on a shard whose booked markers are not rehydrated.
-- Returns a flat list {reservation id, partner id, entry id, deadline, ...} of the holds
-- placed (the caller moves each entry's cap slot to its hold: lua/cap_waitlist.lua).
local WAITLIST_SCAN_MAX = 64
local WAITLIST_DROP_MAX = 256
local WAITLIST_PASSES = 4

-- The members a group entry may take, as lib/choose_member.lua reads them.
local function waitlist_members(gc)
  local out = {}
  for i, m in ipairs(cjson.decode(gc)) do
    out[i] = {rs = m[1], f = tonumber(m[2]), l = tonumber(m[3]), bs = m[4], be = m[5]}
  end
  return out
end

-- Drop `member` from a slot's queue, and the slot from the index once its queue is empty.
local function waitlist_dequeue(index_key, queue_key, slot, member)
  redis.call('ZREM', queue_key, member)
  if redis.call('ZCARD', queue_key) == 0 then redis.call('ZREM', index_key, slot) end
end

-- An entry leaves every queue it waits in: its resource's, or each member's of its group.
local function waitlist_leave(root, eid, resource, f, l, gc)
  local places = gc and gc ~= '' and waitlist_members(gc) or {{rs = resource, f = f, l = l}}
  for _, m in ipairs(places) do
    local slot = m.f .. ':' .. m.l
    waitlist_dequeue(root .. 'wli:' .. m.rs, root .. 'wlq:' .. m.rs .. ':' .. slot, slot, eid)
  end
end

-- Place the entry's hold on `m` ({rs, f, l, bs, be}); `w` is the entry as read.
local function place_from_waitlist(root, unit_root, events_key, deadlines_key, eid, now, w, m)
  local entry_key = root .. 'wl:' .. eid
  local rid = 'rsv' .. eid:sub(3)
  local k = {unit_root = unit_root, record = root .. 'r:' .. rid,
    history = root .. 'rh:' .. rid, fence = root .. 'fence:' .. m.rs, events = events_key,
    deadlines = deadlines_key}
  if redis.call('EXISTS', k.record) == 1 then
    -- Its hold exists already (it cannot: the entry is marked in the same script); never twice.
    redis.call('HSET', entry_key, 'st', 'fulfilled', 'r', rid)
    return nil
  end
  local ttl = {hold = tonumber(w.th), confirmed = tonumber(w.tc), authorized = tonumber(w.ta)}
  local r = {id = rid, p = w.p, vd = w.vd, rs = m.rs, rq = w.rq, s = w.s, e = w.e, f = m.f,
    l = m.l, bs = m.bs, be = m.be, cr = w.cr, pr = w.pr, md = w.md, ik = ''}
  local more = {'og', 'waitlist', 'wl', eid}
  local extra = {'origin', 'waitlist', 'waitlistEntryId', eid}
  if w.g ~= '' then
    more[5] = 'g'; more[6] = w.g
    extra[5] = 'resourceGroupId'; extra[6] = w.g
  end
  local _, _, deadline = place_reservation(k, r, ttl, 'system', 'waitlist', tonumber(w.rt),
    now, more, extra)
  redis.call('HSET', entry_key, 'st', 'fulfilled', 'r', rid, 'ft', now, 'rs', m.rs, 'f', m.f,
    'l', m.l, 'bs', m.bs, 'be', m.be)
  return rid, w.p, deadline
end

local ENTRY_FIELDS = {'p', 'vd', 'rs', 'rq', 's', 'e', 'f', 'l', 'bs', 'be', 'cr', 'pr', 'md',
  'th', 'tc', 'ta', 'rt', 'g', 'gc', 'ch', 'gw'}

local function read_entry(root, eid)
  local values = redis.call('HMGET', root .. 'wl:' .. eid, unpack(ENTRY_FIELDS))
  local w = {}
  for i, name in ipairs(ENTRY_FIELDS) do w[name] = values[i] or '' end
  return w
end

-- The oldest live entry of each waiting slot of `resource` overlapping [first, last]:
-- {entry id, sequence, first unit, last unit}. Dead heads leave their queue on the way.
local function waitlist_heads(root, index_key, resource, first, last, now, budget)
  local heads = {}
  local slots = redis.call('ZRANGEBYSCORE', index_key, first, '+inf', 'LIMIT', 0,
    WAITLIST_SCAN_MAX)
  for _, slot in ipairs(slots) do
    local sep = slot:find(':', 1, true)
    local f, l = tonumber(slot:sub(1, sep - 1)), tonumber(slot:sub(sep + 1))
    if f <= last then
      local queue_key = root .. 'wlq:' .. resource .. ':' .. slot
      while budget.dropped < WAITLIST_DROP_MAX do
        local head = redis.call('ZRANGE', queue_key, 0, 0, 'WITHSCORES')
        if not head[1] then
          redis.call('ZREM', index_key, slot)
          break
        end
        local entry_key = root .. 'wl:' .. head[1]
        local e = redis.call('HMGET', entry_key, 'st', 'x')
        if e[1] == 'waiting' and tonumber(e[2]) > now then
          heads[#heads + 1] = {head[1], tonumber(head[2]), f, l}
          break
        end
        if e[1] == 'waiting' then redis.call('HSET', entry_key, 'st', 'expired') end
        waitlist_dequeue(index_key, queue_key, slot, head[1])
        budget.dropped = budget.dropped + 1
      end
    end
  end
  table.sort(heads, function(a, b) return a[2] < b[2] end)
  return heads
end

local function serve_waitlist(unit_root, events_key, deadlines_key, resource, first, last, now)
  local served = {}
  local root = unit_root:sub(1, -3)
  local index_key = root .. 'wli:' .. resource
  if redis.call('EXISTS', index_key) == 0 then return served end
  if redis.call('EXISTS', root .. 'ready') == 0 then return served end
  local budget = {dropped = 0}
  for _ = 1, WAITLIST_PASSES do
    local elsewhere = false
    for _, c in ipairs(waitlist_heads(root, index_key, resource, first, last, now, budget)) do
      local eid, f, l = c[1], c[3], c[4]
      local w = read_entry(root, eid)
      local m
      if w.gc ~= '' then
        m = choose_member(unit_root, waitlist_members(w.gc), w.ch, tonumber(w.gw), '')
      elseif not first_conflict(unit_root, resource, f, l, '') then
        m = {rs = resource, f = f, l = l, bs = w.bs, be = w.be}
      end
      if m then
        waitlist_leave(root, eid, resource, f, l, w.gc)
        local rid, partner, deadline = place_from_waitlist(root, unit_root, events_key,
          deadlines_key, eid, now, w, m)
        if rid then
          local n = #served
          served[n + 1] = rid; served[n + 2] = partner; served[n + 3] = eid
          served[n + 4] = deadline
        end
        if m.rs ~= resource then elsewhere = true end
      end
    end
    if not elsewhere then break end
  end
  return served
end

-- Serve the waitlists of several places ({rs, f, l} each) a create may take (a pooled
-- create's candidates, a multi-resource create's items): one EXISTS over their slot indexes
-- first, so a shard without waiting entries costs one call, not one per place.
local function serve_waitlists(unit_root, events_key, deadlines_key, places, now)
  local handoffs, index_keys = {}, {}
  local root = unit_root:sub(1, -3)
  for i, p in ipairs(places) do index_keys[i] = root .. 'wli:' .. p.rs end
  if #index_keys == 0 or redis.call('EXISTS', unpack(index_keys)) == 0 then return handoffs end
  for _, p in ipairs(places) do
    for _, h in ipairs(serve_waitlist(unit_root, events_key, deadlines_key, p.rs, p.f, p.l,
        now)) do
      handoffs[#handoffs + 1] = h
    end
  end
  return handoffs
end
