--@include lib/first_conflict.lua
--@include lib/best_fit.lua
-- A resource group's member for one stay (issue 16): `candidates` ({rs, f, l, ...}, units
-- with buffers) in the order the group's strategy tries them. 'first' takes the first free
-- one; 'tightest' (best_fit) the free one with the fewest free units around the stay, looked
-- at up to `window` units on each side (lib/best_fit.lua). Units owned by `owner` count as
-- free. Used by a pooled create and by the waitlist handoff of an entry on a group
-- (lib/serve_waitlist.lua), so both choose alike. nil when no member is free.
local function choose_member(unit_root, candidates, choice, window, owner)
  if choice == 'tightest' then return best_fit(unit_root, candidates, owner, window) end
  for _, c in ipairs(candidates) do
    if not first_conflict(unit_root, c.rs, c.f, c.l, owner) then return c end
  end
  return nil
end
