-- The unit range [first, last] of one hold: numbers, not empty, at most `max_units` long.
-- nil when fine, else the INVALID reply (a script validates before its first write).
local function check_units(first, last, max_units)
  if not first or not last then return {OUTCOME.INVALID, 'non-numeric argument'} end
  if last < first then return {OUTCOME.INVALID, 'empty interval'} end
  if last - first + 1 > max_units then return {OUTCOME.INVALID, 'too many units'} end
  return nil
end
