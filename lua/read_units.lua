--[[ Read the occupancy of units [first, last] of one resource, without writing anything.
  KEYS[1] <prefix>{sg:<shard>}:u:   unit root; unit keys are <root><resource>:<index>
  KEYS[2] (optional) <prefix>{sg:<shard>}:avr:<resource>   the vendor's availability rules
          revision (issue 13), answered as the fourth element ('0' when never published)
  ARGV[1] resource id
  ARGV[2] first unit index
  ARGV[3] last unit index (inclusive)
  ARGV[4] max units one read may cover
  Returns: {1, occupancy, holders[, rules revision]} where occupancy has one character per unit, in order:
           '.' free, 'h' held (a live hold or reservation), 'b' booked (a booked marker);
           holders lists each distinct holder of a held unit once, in order of first unit
  Errors (negative integers): -2 INVALID (+ reason)
]]
--@include @outcomes
--@include lib/unit_key.lua

local unit_root, resource = KEYS[1], ARGV[1]
local first, last, max_units = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not first or not last or not max_units then return {OUTCOME.INVALID, 'non-numeric argument'} end
if last < first then return {OUTCOME.INVALID, 'empty interval'} end
if last - first + 1 > max_units then return {OUTCOME.INVALID, 'too many units'} end

local out, holders, seen = {}, {}, {}
for i = first, last do
  local holder = redis.call('GET', unit_key(unit_root, resource, i))
  if not holder then
    out[#out + 1] = '.'
  elseif string.sub(holder, 1, 2) == 'B|' then
    out[#out + 1] = 'b'
  else
    out[#out + 1] = 'h'
    if not seen[holder] then
      seen[holder] = true
      holders[#holders + 1] = holder
    end
  end
end
if KEYS[2] then
  return {OUTCOME.OK, table.concat(out), holders, redis.call('GET', KEYS[2]) or '0'}
end
return {OUTCOME.OK, table.concat(out), holders}
