--@include lib/owns_all.lua
--@include lib/items_of.lua
-- True when `owner` holds every unit of every item of the reservation (revalidation).
local function owns_items(unit_root, rec, owner)
  for _, item in ipairs(items_of(rec)) do
    if not owns_all(unit_root, item.rs, item.f, item.l, owner) then return false end
  end
  return true
end
