--@include lib/unit_key.lua
-- Delete the units of [first, last] that `owner` still holds; others' units are untouched.
local function free_units(unit_root, resource, first, last, owner)
  for i = first, last do
    local key = unit_key(unit_root, resource, i)
    if redis.call('GET', key) == owner then
      redis.call('DEL', key)
    end
  end
end
