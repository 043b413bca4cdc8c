--@include lib/unit_key.lua
-- True when `owner` holds every unit of [first, last] (mandatory revalidation).
local function owns_all(unit_root, resource, first, last, owner)
  for i = first, last do
    if redis.call('GET', unit_key(unit_root, resource, i)) ~= owner then
      return false
    end
  end
  return true
end
