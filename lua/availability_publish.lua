--[[ Publish the revision of a vendor's availability rules beside one of its resources
  (issue 13), never moving it backwards: Postgres numbers the revisions, and a process that
  publishes an older one late must not hide a newer one.
  KEYS[1] <prefix>{sg:<shard>}:avr:<resource>   the resource's rules revision
  ARGV[1] revision (a non-negative integer)
  Returns: {1, revision now published}
  Errors (negative integers): -2 INVALID (+ reason)
]]
--@include @outcomes

local revision = tonumber(ARGV[1])
if not revision or revision < 0 then return {OUTCOME.INVALID, 'revision must be a non-negative integer'} end
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if revision > current then
  redis.call('SET', KEYS[1], ARGV[1])
  current = revision
end
return {OUTCOME.OK, tostring(current)}
