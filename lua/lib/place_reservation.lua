--@include lib/load_reservation.lua
--@include lib/emit_transition.lua
--@include lib/walk_auto_steps.lua
--@include lib/settle.lua
-- Write a new reservation, as every create does (a direct, pooled or multi-resource create, a
-- waitlist handoff): walk it from INTENT_CREATED as far as the vendor's policy allows (r.cr,
-- r.pr: '1'/'0'), the deadline of the stage it stops in, the next token of `k.fence`, the
-- record (r's fields plus the flat list `more`), ONE creation entry (`extra` on the stream
-- entry only), then units, record expiry and deadline index (settle). The caller checked
-- every unit free first.
--   k: {unit_root, record, history, fence, events, deadlines}
--   r: {id, p, vd, rs, rq, s, e, f, l, bs, be, cr, pr, md, ik}
--   items: a multi-resource reservation's items as lib/items_of.lua lists them (or nil)
-- Returns the state it stops in, version, deadline, fencing token.
local function place_reservation(k, r, ttl, actor, reason, retention, now, more, extra, items)
  local path = walk_auto_steps({'INTENT_CREATED'}, r.cr == '1', r.pr == '1')
  local deadline = now + ttl.hold
  for _, state in ipairs(path) do
    if STAGE_TTL[state] then deadline = now + ttl[STAGE_TTL[state]] end
  end
  local token = redis.call('INCR', k.fence)
  local final, version = path[#path], #path - 1
  local fields = {'st', final, 'v', version, 'p', r.p, 'vd', r.vd, 'rs', r.rs, 'rq', r.rq,
    's', r.s, 'e', r.e, 'f', r.f, 'l', r.l, 'bs', r.bs, 'be', r.be, 'c', now, 'dl', deadline,
    'cr', r.cr, 'pr', r.pr, 'x', 0, 't', token, 'md', r.md, 'ik', r.ik}
  for _, v in ipairs(more or {}) do fields[#fields + 1] = v end
  redis.call('HSET', k.record, unpack(fields))
  local rec = load_reservation(k.record, r.id)
  rec.items = items
  -- One commit-queue entry for the whole walk, INTENT_CREATED being version 0.
  emit_transition(k.events, k.history, rec, path[1], {unpack(path, 2)}, version, actor, reason,
    r.md, r.ik, now, deadline, true, extra)
  settle(k.unit_root, k.record, k.history, k.deadlines, rec, final, deadline, retention, 0, now)
  return final, version, deadline, token
end
