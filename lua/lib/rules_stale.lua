-- Availability rules (issue 13): the caller checked the slot against the vendor's rules at
-- `revision` ('' or nil: no check); the revision published beside a resource the script may
-- take (`<root>avr:<resource>`, '0' when absent) being another one means the rules changed
-- meanwhile (one MGET however many). nil when current, else the RULES_STALE reply (+ the
-- revision published).
local function rules_stale(revision_keys, revision)
  if not revision or revision == '' or #revision_keys == 0 then return nil end
  for _, published in ipairs(redis.call('MGET', unpack(revision_keys))) do
    published = published or '0'
    if published ~= revision then return {OUTCOME.RULES_STALE, published} end
  end
  return nil
end
