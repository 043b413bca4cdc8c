--@include lib/unit_key.lua
-- The first unit of [first, last] owned by someone other than `owner`:
-- returns holder, index; or nil when every unit is free or already ours.
local function first_conflict(unit_root, resource, first, last, owner)
  for i = first, last do
    local holder = redis.call('GET', unit_key(unit_root, resource, i))
    if holder and holder ~= owner then
      return holder, i
    end
  end
  return nil
end
