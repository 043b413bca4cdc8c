-- Record one script call's move in the reservation's history and the shard's commit-queue
-- stream, in the same script as the state change, so the event cannot be lost between Redis
-- and the queue. ONE entry per call: `path` lists every state the call passed through, in
-- order (waived steps included); its last state is `toState` and `version` is the version
-- after it, so the call's transitions carry versions version-#path+1 .. version. The worker
-- expands the path into one history and one audit row per transition, each keyed by
-- <reservation id>:<its version>, so Postgres writes stay idempotent under redelivery.
-- `creation` adds the fields that never change (partner, vendor, resource, requester, slot,
-- block, created-at): they travel only on the creation event. Reason, metadata and
-- idempotency key appear only when non-empty; expiresAt only while the reservation lives.
-- `extra` (a flat name, value list) rides on the stream entry only (a move's old and new
-- resource and slot: lua/modify_reservation.lua).
local function emit_transition(events_key, history_key, rec, from, path, version, actor,
                               reason, metadata, ik, now, expires_at, creation, extra)
  local to = path[#path]
  local fields = {'reservationId', rec.id, 'version', version, 'fromState', from,
    'toState', to, 'triggeredBy', actor, 'timestamp', now}
  local n = #fields
  local function add(name, value)
    fields[n + 1] = name; fields[n + 2] = value; n = n + 2
  end
  local joined
  if #path > 1 then
    joined = table.concat(path, ',')
    add('path', joined)
    add('fromVersion', version - #path + 1)
  end
  if expires_at ~= '' then add('expiresAt', expires_at) end
  if reason ~= '' then add('reason', reason) end
  local has_md = metadata ~= '' and metadata ~= '{}'
  if has_md then add('metadata', metadata) end
  if ik ~= '' then add('idempotencyKey', ik) end
  if creation then
    add('partnerId', rec.p); add('vendorId', rec.vd); add('resourceId', rec.rs)
    add('requesterId', rec.rq); add('slotStart', rec.s); add('slotEnd', rec.e)
    add('blockStart', rec.bs); add('blockEnd', rec.be); add('createdAt', rec.c)
  end
  if extra then
    for i = 1, #extra, 2 do add(extra[i], extra[i + 1]) end
  end
  -- A multi-resource reservation's items ride on every entry: the worker books each item.
  if rec.it and rec.it ~= '' then add('items', rec.it) end
  redis.call('XADD', events_key, '*', unpack(fields))
  -- The history, compact: one JSON array per call, [version, from, to, actor, time, steps,
  -- reason, metadata, idempotency key], trailing empty items left off. A call of several
  -- steps only ever follows the main path (waived steps), so their number says it all; the
  -- creation's metadata and key are the record's own ('md', 'ik'), not repeated here.
  local entry = {version, from, to, actor, now}
  local tail = {#path, reason, creation and '' or metadata, creation and '' or ik}
  if tail[3] == '{}' then tail[3] = '' end
  local last = 0
  for i = 2, 4 do if tail[i] ~= '' then last = i end end
  if last == 0 and #path > 1 then last = 1 end
  for i = 1, last do entry[5 + i] = tail[i] end
  redis.call('RPUSH', history_key, cjson.encode(entry))
end
