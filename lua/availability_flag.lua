--[[ Flag (or clear) a live reservation whose slot the vendor's availability no longer
  allows (issue 13): the transition script fails a flagged reservation at its next step as
  FAILED_AVAILABILITY_CHANGED. Only a reservation still on the slot the caller checked is
  touched (a move since then was checked against the rules by itself).
  KEYS[1] <prefix>{sg:<shard>}:r:<id>   reservation record
  ARGV[1] resource id the caller checked
  ARGV[2] slot start ms the caller checked
  ARGV[3] slot end ms the caller checked
  ARGV[4] reasons, comma-separated ('' clears the flag)
  Returns: {1, 1 when the record was changed else 0}
]]
--@include @outcomes

local values = redis.call('HMGET', KEYS[1], 'rs', 's', 'e', 'ua')
if not values[1] or values[1] ~= ARGV[1] or values[2] ~= ARGV[2] or values[3] ~= ARGV[3] then
  return {OUTCOME.OK, 0}
end
if ARGV[4] == '' then
  if not values[4] then return {OUTCOME.OK, 0} end
  redis.call('HDEL', KEYS[1], 'ua')
  return {OUTCOME.OK, 1}
end
if values[4] == ARGV[4] then return {OUTCOME.OK, 0} end
redis.call('HSET', KEYS[1], 'ua', ARGV[4])
return {OUTCOME.OK, 1}
