--[[ Move a reservation: a caller's action, the reaper's expiry, or a hold extension.
  One compare-and-set on the version; live holds are revalidated (the hold must still own
  every unit); staged TTLs are applied to the record and every unit key; the call's
  path (every step, waived ones included) is appended as ONE entry to the history and the
  shard's commit-queue stream in this same script.
  KEYS[1] <prefix>{sg:<shard>}:u:          unit root; unit keys are <root><resource>:<index>
  KEYS[2] <prefix>{sg:<shard>}:r:<id>      reservation record
  KEYS[3] <prefix>{sg:<shard>}:rh:<id>     reservation history
  KEYS[4] <prefix>{sg:<shard>}:events      the shard's commit-queue stream
  KEYS[5] <prefix>{sg:<shard>}:deadlines   deadline index
  ARGV[1] reservation id
  ARGV[2] operation: an action of engine/lifecycle.py ACTIONS, 'expire' or 'extend'
  ARGV[3] triggered by (partner, vendor, requester, system, timeout, ops, admin)
  ARGV[4] expected version ('' = any)
  ARGV[5] reason ('' for none)
  ARGV[6] metadata (JSON object text)
  ARGV[7] idempotency key ('' for none)
  ARGV[8] hold stage ttl ms
  ARGV[9] confirmed stage ttl ms
  ARGV[10] authorized stage ttl ms
  ARGV[11] record retention ms after a terminal state
  ARGV[12] booked marker retention ms after the booking's end
  ARGV[13] booking id (finalize-commit only, else '')
  ARGV[14] extension ttl ms (extend only)
  ARGV[15] max total hold time ms from creation (extend only)
  ARGV[16] max number of extensions (extend only)
  ARGV[17] tenancy: the caller's partner scope ('' = any); another partner's id is NOT_FOUND
  ARGV[18] tenancy: the caller's vendor ('' = any); another vendor's id is NOT_FOUND
  ARGV[19] '1': the reply also carries the record and history as they are after the call
  Derived keys (issue 16, waitlist handoff): a call that frees units serves the resource's
  waitlist in this same script (lua/lib/serve_waitlist.lua), building the waitlist, record
  and fence keys it needs from the unit root (same hash tag, as unit keys are).
  Returns: {1, state, version, deadline_ms, partner id[, {field, value, ...}, {history JSON, ...}]
           [, {handoff reservation id, partner id, entry id, deadline, ...}]}: the handoffs
           (holds placed for waitlist entries) come 8th, after the record and history (empty
           lists when not asked for), and only when there are some
  Errors (negative integers): -2 INVALID (+ reason), -4 NOT_FOUND, -6 EXTENSION_LIMIT,
           -7 MAX_DURATION, -8 INVALID_TRANSITION (+ current state), -9 VERSION_MISMATCH
           (+ current version), -10 HOLD_LOST (now FAILED_AVAILABILITY_CHANGED, + state, + version, + partner),
           -11 TERMINAL (+ state), -16 EXPIRED (overdue: now expired, + state, + version, + partner),
           -17 NOT_DUE (expire before the deadline: + deadline),
           -26 AVAILABILITY_CHANGED (the record is flagged by lua/availability_flag.lua: now
           FAILED_AVAILABILITY_CHANGED, + state, + version, + partner, + reasons),
           -27 SLOT_REFUSED (extend of a slot that has begun: + 'in_past'),
           -45 EXTEND_NOT_LATER (now + ttl is not after the deadline: nothing spent,
           + deadline, + now + ttl);
           HOLD_LOST, EXPIRED and AVAILABILITY_CHANGED carry the handoffs 6th (after the
           reasons, '' for the first two) when there are some
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/owns_items.lua
--@include lib/load_reservation.lua
--@include lib/emit_transition.lua
--@include lib/walk_auto_steps.lua
--@include lib/settle.lua
--@include lib/serve_waitlist.lua
--@include lib/expire_record.lua

local unit_root, record_key, history_key = KEYS[1], KEYS[2], KEYS[3]
local events_key, deadlines_key = KEYS[4], KEYS[5]
local id, op, actor = ARGV[1], ARGV[2], ARGV[3]
local reason, metadata, ik = ARGV[5], ARGV[6], ARGV[7]
local ttl = {hold = tonumber(ARGV[8]), confirmed = tonumber(ARGV[9]),
  authorized = tonumber(ARGV[10])}
local retention, marker_retention = tonumber(ARGV[11]), tonumber(ARGV[12])

-- The reply of a successful call: what the caller's response shows, as this call left it.
local function answer(state, version, deadline, partner, handoffs)
  local out = {OUTCOME.OK, state, version, deadline, partner}
  if ARGV[19] == '1' then
    out[6] = redis.call('HGETALL', record_key)
    out[7] = redis.call('LRANGE', history_key, 0, -1)
  end
  if handoffs and #handoffs > 0 then
    out[6] = out[6] or {}; out[7] = out[7] or {}; out[8] = handoffs
  end
  return out
end

if not retention or not marker_retention then return {OUTCOME.INVALID, 'non-numeric argument'} end
for _, v in pairs(ttl) do if not v or v <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end end
if op ~= 'expire' and op ~= 'extend' and not ACTIONS[op] then return {OUTCOME.INVALID, 'unknown operation'} end
if not pcall(cjson.decode, metadata) then return {OUTCOME.INVALID, 'metadata is not JSON'} end

local rec = load_reservation(record_key, id)
if not rec then return {OUTCOME.NOT_FOUND} end
-- Another tenant's reservation is not found, exactly as a missing one (no probing of ids).
if (ARGV[17] and ARGV[17] ~= '' and rec.p ~= ARGV[17])
    or (ARGV[18] and ARGV[18] ~= '' and rec.vd ~= ARGV[18]) then
  return {OUTCOME.NOT_FOUND}
end
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= rec.v then return {OUTCOME.VERSION_MISMATCH, rec.v} end
if TERMINAL[rec.st] then return {OUTCOME.TERMINAL, rec.st} end

local now = now_ms()
local state = rec.st
-- Issue 13: the vendor's availability no longer allows the slot (flagged on the record).
local unavailable = redis.call('HGET', record_key, 'ua')
local overdue = PRE_COMMIT[state] and rec.dl <= now

-- Apply `path` (states after the current one): CAS already checked, so every step is
-- checked against the table (a failure here is a bug, hence error()); the path is recorded
-- as one entry and settled.
local function apply(path, why, code)
  local deadline = rec.dl
  for _, s in ipairs(path) do
    if STAGE_TTL[s] then deadline = now + ttl[STAGE_TTL[s]] end
  end
  local final = path[#path]
  if final == 'COMMIT_IN_PROGRESS' then deadline = now + ttl.authorized end
  local from = state
  for _, s in ipairs(path) do
    if not EDGES[from][s] then error('lifecycle bug: ' .. from .. ' -> ' .. s) end
    from = s
  end
  local v = rec.v + #path
  -- Fencing (issue 15): the commit decision takes a token from the resource's fencing
  -- counter (the one hold tokens come from, same hash tag); the booking row carries it and
  -- Postgres refuses a booking older than one already committed on its units
  -- (engine/migrations/0010_fencing.sql).
  local extra
  if final == 'COMMIT_IN_PROGRESS' then
    local token = redis.call('INCR', string.sub(unit_root, 1, -4) .. ':fence:' .. rec.rs)
    redis.call('HSET', record_key, 'ct', token)
    extra = {'fenceToken', token}
  end
  -- One commit-queue entry for the whole path (waived steps included).
  emit_transition(events_key, history_key, rec, state, path, v, actor, why, metadata, ik, now,
    TERMINAL[final] and '' or deadline, false, extra)
  local fields = {'st', final, 'v', v, 'dl', deadline}
  if final:sub(1, 7) == 'FAILED_' then
    fields[#fields + 1] = 'fr'; fields[#fields + 1] = why ~= '' and why or final
  end
  if final == 'COMMITTED' then
    fields[#fields + 1] = 'bk'; fields[#fields + 1] = ARGV[13]
  end
  redis.call('HSET', record_key, unpack(fields))
  settle(unit_root, record_key, history_key, deadlines_key, rec, final, deadline, retention,
    marker_retention, now)
  local handoffs
  if TERMINAL[final] and final ~= 'COMMITTED' then
    -- The units are free: the resource's waitlist is served before anyone else can take them.
    -- Every item of a multi-resource reservation frees its units: each serves its waitlist.
    handoffs = serve_waitlists(unit_root, events_key, deadlines_key, items_of(rec), now)
  end
  if code then
    if handoffs and #handoffs > 0 then return {code, final, v, rec.p, '', handoffs} end
    return {code, final, v, rec.p}
  end
  return answer(final, v, deadline, rec.p, handoffs)
end

if op == 'expire' then
  if state == 'COMMIT_IN_PROGRESS' then return {OUTCOME.INVALID_TRANSITION, state} end
  if rec.dl > now then return {OUTCOME.NOT_DUE, rec.dl} end
  -- The same writes as the reaper's batch (lua/reap.lua): lua/lib/expire_record.lua.
  local final, v, handoffs = expire_record(unit_root, events_key, deadlines_key, record_key,
    history_key, rec, now, retention, marker_retention)
  return answer(final, v, rec.dl, rec.p, handoffs)
end

if op == 'extend' then
  if not PRE_COMMIT[state] then return {OUTCOME.INVALID_TRANSITION, state} end
  if overdue then return apply({EXPIRES_AS[state]}, 'deadline passed', OUTCOME.EXPIRED) end
  local ext_ttl, max_total, max_ext = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
  if not ext_ttl or ext_ttl <= 0 or not max_total or not max_ext then return {OUTCOME.INVALID, 'bad extension'} end
  -- An extension that cannot move the deadline later spends nothing (issue 17).
  if now + ext_ttl <= rec.dl then return {OUTCOME.EXTEND_NOT_LATER, rec.dl, now + ext_ttl} end
  if rec.x >= max_ext then return {OUTCOME.EXTENSION_LIMIT} end
  -- Issue 13: a slot that has begun is in the past; holding it longer holds nothing.
  if (tonumber(rec.s) or math.huge) <= now then return {OUTCOME.SLOT_REFUSED, 'in_past'} end
  if unavailable then
    local reply = apply({'FAILED_AVAILABILITY_CHANGED'}, 'availability changed: ' .. unavailable,
      OUTCOME.AVAILABILITY_CHANGED)
    reply[5] = unavailable
    return reply
  end
  local deadline = now + ext_ttl
  if deadline - tonumber(rec.c) > max_total then return {OUTCOME.MAX_DURATION} end
  if not owns_items(unit_root, rec, id) then
    return apply({'FAILED_AVAILABILITY_CHANGED'}, 'hold lost', OUTCOME.HOLD_LOST)
  end
  local v = rec.v + 1
  emit_transition(events_key, history_key, rec, state, {state}, v, actor,
    reason ~= '' and reason or 'extended', metadata, ik, now, deadline)
  redis.call('HSET', record_key, 'v', v, 'dl', deadline, 'x', rec.x + 1)
  rec.dl = deadline
  settle(unit_root, record_key, history_key, deadlines_key, rec, state, deadline, retention,
    marker_retention, now)
  return answer(state, v, deadline, rec.p)
end

local action = ACTIONS[op]
if action.from then
  if action.from ~= state then return {OUTCOME.INVALID_TRANSITION, state} end
elseif not PRE_COMMIT[state] and not (op ~= 'cancel' and state == 'COMMIT_IN_PROGRESS') then
  return {OUTCOME.INVALID_TRANSITION, state}
end

if overdue then
  -- Expired in fact: record it (idempotent with the reaper) and refuse the action.
  return apply({EXPIRES_AS[state]}, 'deadline passed', OUTCOME.EXPIRED)
end

local forward = action.to ~= 'CANCELLED' and action.to:sub(1, 7) ~= 'FAILED_'
if forward and PRE_COMMIT[state] and not owns_items(unit_root, rec, id) then
  -- Mandatory revalidation: the hold lost a unit, so the slot changed under us.
  return apply({'FAILED_AVAILABILITY_CHANGED'}, 'hold lost', OUTCOME.HOLD_LOST)
end

if forward and PRE_COMMIT[state] and unavailable then
  local reply = apply({'FAILED_AVAILABILITY_CHANGED'}, 'availability changed: ' .. unavailable,
    OUTCOME.AVAILABILITY_CHANGED)
  reply[5] = unavailable
  return reply
end

local path = walk_auto_steps({action.to}, rec.cr == '1', rec.pr == '1')
return apply(path, reason)
