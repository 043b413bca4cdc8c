-- The reservation record as a table (nil when there is none). Field names mirror the hash:
-- st state, v version, p partner, vd vendor, rs resource, rq requester, s/e slot start/end,
-- f/l first/last unit, bs/be buffered block start/end, c created, dl deadline,
-- cr confirmation required, pr payment required, x extensions, bk booking id, fr failure reason,
-- it the items of a multi-resource reservation (JSON [[resource, slot start, slot end, first,
-- last, block start, block end], ...]; '' for one resource, whose item is rs/f/l).
local function load_reservation(record_key, id)
  local names = {'st', 'v', 'p', 'vd', 'rs', 'rq', 's', 'e', 'f', 'l', 'bs', 'be', 'c', 'dl',
    'cr', 'pr', 'x', 'bk', 'fr', 'ik', 'it'}
  local values = redis.call('HMGET', record_key, unpack(names))
  if not values[1] then return nil end
  local rec = {id = id}
  for i, name in ipairs(names) do rec[name] = values[i] or '' end
  rec.v, rec.f, rec.l = tonumber(rec.v), tonumber(rec.f), tonumber(rec.l)
  rec.dl, rec.x = tonumber(rec.dl) or 0, tonumber(rec.x) or 0
  return rec
end
