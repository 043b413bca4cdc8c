--[[ Free one unit, but only if it still belongs to the expected owner (compare-and-delete).
  KEYS[1] <prefix>{sg:<shard>}:u:<resource>:<index>   the unit key
  ARGV[1] expected owner (hold id, reservation id, or 'B|<reservation id>' for a marker)
  Returns: {1, 1} freed, {1, 0} the owner had changed (nothing done)
]]
--@include @outcomes
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return {OUTCOME.OK, 1}
end
return {OUTCOME.OK, 0}
