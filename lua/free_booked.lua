--[[ Free the units of a cancelled booking (issue 12): delete the booked markers that are
  still this booking's, nothing else.
  KEYS[1] <prefix>{sg:<shard>}:u:   unit root; unit keys are <root><resource>:<index>
  ARGV[1] resource id
  ARGV[2] first unit index
  ARGV[3] last unit index (inclusive)
  ARGV[4] reservation id of the booking
  Returns: {1, markers_deleted}
  Errors (negative integers): -2 INVALID
]]
--@include @outcomes
--@include @lifecycle
--@include lib/unit_key.lua

local unit_root, resource = KEYS[1], ARGV[1]
local first, last = tonumber(ARGV[2]), tonumber(ARGV[3])
if not first or not last or last < first then return {OUTCOME.INVALID} end
local marker = BOOKED_PREFIX .. ARGV[4]
local deleted = 0
for i = first, last do
  local key = unit_key(unit_root, resource, i)
  if redis.call('GET', key) == marker then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
end
return {OUTCOME.OK, deleted}
