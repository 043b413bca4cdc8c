--[[ Restore the booked markers of one committed booking (rehydration from Postgres).
  KEYS[1] <prefix>{sg:<shard>}:u:   unit root; unit keys are <root><resource>:<index>
  ARGV[1] resource id
  ARGV[2] first unit index
  ARGV[3] last unit index (inclusive)
  ARGV[4] reservation id of the booking
  ARGV[5] marker expiry, ms since epoch
  Returns: {1, markers_written, holds_overwritten} (a live hold on a booked unit loses it:
           the booking is the record; that hold fails its next revalidation)
  Errors (negative integers): -2 INVALID
]]
--@include @outcomes
--@include @lifecycle
--@include lib/unit_key.lua

local unit_root, resource = KEYS[1], ARGV[1]
local first, last, expires_at = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
if not first or not last or not expires_at or last < first then return {OUTCOME.INVALID} end
local marker = BOOKED_PREFIX .. ARGV[4]
local written, overwritten = 0, 0
for i = first, last do
  local key = unit_key(unit_root, resource, i)
  local current = redis.call('GET', key)
  if current ~= marker then
    if current and current:sub(1, #BOOKED_PREFIX) ~= BOOKED_PREFIX then overwritten = overwritten + 1 end
    redis.call('SET', key, marker, 'PXAT', expires_at)
    written = written + 1
  end
end
return {OUTCOME.OK, written, overwritten}
