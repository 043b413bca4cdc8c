-- Append one transition to the reservation's history and to the shard's commit-queue
-- stream, in the same script as the state change, so the event cannot be lost between
-- Redis and the queue. The event id (<reservation id>:<version>) makes every Postgres
-- write idempotent, although the stream delivers at least once.
local function emit_transition(events_key, history_key, rec, from, to, version, actor,
                               reason, metadata, ik, now, expires_at)
  redis.call('XADD', events_key, '*',
    'eventId', rec.id .. ':' .. version, 'reservationId', rec.id,
    'fromState', from, 'toState', to, 'triggeredBy', actor, 'reason', reason,
    'metadata', metadata, 'timestamp', now, 'idempotencyKey', ik, 'version', version,
    'partnerId', rec.p, 'vendorId', rec.vd, 'resourceId', rec.rs, 'requesterId', rec.rq,
    'slotStart', rec.s, 'slotEnd', rec.e, 'blockStart', rec.bs, 'blockEnd', rec.be,
    'createdAt', rec.c, 'expiresAt', expires_at)
  local entry = {f = from, t = to, by = actor, ts = now, v = version}
  if reason ~= '' then entry.r = reason end
  if metadata ~= '' and metadata ~= '{}' then entry.m = metadata end
  if ik ~= '' then entry.ik = ik end
  redis.call('RPUSH', history_key, cjson.encode(entry))
end
