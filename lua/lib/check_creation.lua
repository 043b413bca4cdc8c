-- What every create script checks in its settings before its first write (Redis has no
-- rollback): the unit cap and the retention are numbers, each stage TTL positive, the
-- metadata JSON. nil when fine, else the INVALID reply.
local function check_creation(ttl, max_units, retention, metadata)
  if not max_units or not retention then return {OUTCOME.INVALID, 'non-numeric argument'} end
  for _, v in pairs(ttl) do
    if not v or v <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end
  end
  if not pcall(cjson.decode, metadata) then return {OUTCOME.INVALID, 'metadata is not JSON'} end
  return nil
end
