-- The units a reservation holds, as a list of {rs, f, l}: its items (a multi-resource
-- reservation, issue 16) or its one resource.
local function items_of(rec)
  if rec.it == nil or rec.it == '' then return {{rs = rec.rs, f = rec.f, l = rec.l}} end
  local out = {}
  for i, item in ipairs(cjson.decode(rec.it)) do
    out[i] = {rs = item[1], f = tonumber(item[4]), l = tonumber(item[5])}
  end
  return out
end
