--@include lib/unit_key.lua
-- Point every unit of [first, last] at `value`, expiring at `expires_at` (ms since epoch);
-- expires_at = 0 writes them without expiry.
local function set_units(unit_root, resource, first, last, value, expires_at)
  for i = first, last do
    if expires_at > 0 then
      redis.call('SET', unit_key(unit_root, resource, i), value, 'PXAT', expires_at)
    else
      redis.call('SET', unit_key(unit_root, resource, i), value)
    end
  end
end
