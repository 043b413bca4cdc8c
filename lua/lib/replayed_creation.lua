--@include lib/load_reservation.lua
-- A create retried after its reservation landed answers as the first call did:
-- {1, state, version, deadline, fence token, created at, resource}; an id that names another
-- reservation (`same(existing)` false) is HOLD_ID_REUSED; nil when there is no record yet.
local function replayed_creation(record_key, id, same)
  local existing = load_reservation(record_key, id)
  if not existing then return nil end
  if not same(existing) then
    return {OUTCOME.HOLD_ID_REUSED, 'reservation id names another reservation'}
  end
  local token = redis.call('HGET', record_key, 't')
  return {OUTCOME.OK, existing.st, existing.v, existing.dl, tonumber(token),
    tonumber(existing.c), existing.rs}
end
