-- The units a reservation holds, as a list of {rs, f, l}: its items (a multi-resource
-- reservation, issue 16) or its one resource.
-- Decoded once per script call (kept on `rec`; the creating script hands its own over).
local function items_of(rec)
  if rec.it == nil or rec.it == '' then return {{rs = rec.rs, f = rec.f, l = rec.l}} end
  if rec.items then return rec.items end
  local out = {}
  for i, item in ipairs(cjson.decode(rec.it)) do
    out[i] = {rs = item[1], f = tonumber(item[4]), l = tonumber(item[5]),
      be = tonumber(item[7])}
  end
  rec.items = out
  return out
end
