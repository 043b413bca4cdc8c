-- The key of one unit of a resource; mirrors engine/keys.py KeySpace.unit().
local function unit_key(unit_root, resource, index)
  return unit_root .. resource .. ':' .. index
end
