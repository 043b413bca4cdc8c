--@include lib/first_conflict.lua
-- Best fit (issue 16): the candidate {rs, f, l} whose stay [f, l] is free (a unit held by
-- `owner` counts as free) and whose free gap around it is smallest: free units just before f
-- plus free units just after l, each side counted up to `window`; ties to the earlier
-- candidate; nil when no candidate is free. The least fragmentation the hold can leave.
--
-- Candidates are read in order, each stay up to its first taken unit
-- (lib/first_conflict.lua), then the free one's two neighbours: both taken is a perfect fit
-- (gap 0), chosen at once. Then the open sides of the free ones widen in rounds of one MGET
-- each (in chunks), never a call per unit, by doubling spans (distance 2, 3-4, 5-8, ... up to
-- `window`), each round only for the candidates that can still win: one whose gap so far (a
-- lower bound) is above the best exact gap found, or equal to it but later in order, is
-- dropped unread. Unit keys are the unit root, the resource, ':' and the
-- index (as lib/unit_key.lua builds them); each index becomes a string once per call.
local function best_fit(unit_root, candidates, owner, window)
  local function mget(keys, count)  -- MGET in chunks (unpack has a C-stack limit)
    if count <= 1000 then return redis.call('MGET', unpack(keys, 1, count)) end
    local out, n = {}, 0
    for from = 1, count, 1000 do
      local part = redis.call('MGET', unpack(keys, from, math.min(count, from + 999)))
      for i = 1, #part do n = n + 1; out[n] = part[i] end
    end
    return out
  end
  local names = {}  -- index -> its string

  -- In order: a candidate's stay, one unit at a time up to its first taken unit (a busy day
  -- ends most candidates at their first unit), then its two neighbours. Both neighbours
  -- taken is a perfect fit: nothing earlier had one, nothing later can beat it, so it wins
  -- at once and the rest is never read.
  local live, m = {}, 0
  for order, c in ipairs(candidates) do
    if not first_conflict(unit_root, c.rs, c.f, c.l, owner) then
      if window <= 0 then return c end  -- no window: every gap is 0
      local prefix = unit_root .. c.rs .. ':'
      c.prefix = prefix
      local near = redis.call('MGET', prefix .. (c.f - 1), prefix .. (c.l + 1))
      local before, after = near[1], near[2]
      if before and after then return c end
      m = m + 1
      live[m] = {c, order, before and 0 or 1, after and 0 or 1,
        not before and window > 1, not after and window > 1}
    end
  end
  if m == 0 then return nil end

  local span = 1  -- the distance read so far on the open sides
  while true do
    -- The best exact gap so far (both sides closed), ties to the earlier candidate.
    local best, best_gap, best_order
    for _, e in ipairs(live) do
      if not e[5] and not e[6] then
        local gap = e[3] + e[4]
        if not best or gap < best_gap or (gap == best_gap and e[2] < best_order) then
          best, best_gap, best_order = e, gap, e[2]
        end
      end
    end
    -- Keep who can still win; read the next span of their open sides.
    local keep, k = {}, 0
    local upto = math.min(window, 2 * span)
    local keys, n = {}, 0
    for _, e in ipairs(live) do
      local bound = e[3] + e[4]
      if e == best or not best or bound < best_gap
          or (bound == best_gap and e[2] < best_order) then
        k = k + 1; keep[k] = e
        local c = e[1]
        local prefix = c.prefix
        if e[5] then
          local f = c.f
          for d = span + 1, upto do
            local i = f - d
            local s = names[i]
            if not s then s = tostring(i); names[i] = s end
            n = n + 1; keys[n] = prefix .. s
          end
        end
        if e[6] then
          local l = c.l
          for d = span + 1, upto do
            local i = l + d
            local s = names[i]
            if not s then s = tostring(i); names[i] = s end
            n = n + 1; keys[n] = prefix .. s
          end
        end
      end
    end
    live = keep
    if n == 0 then return best[1] end  -- every one left is closed: best is among them
    local got, pos = mget(keys, n), 0
    local closes = upto >= window
    for _, e in ipairs(live) do
      for side = 5, 6 do  -- e[side]: the side is open; e[side - 2]: its count
        if e[side] then
          local count, open = e[side - 2], true
          for _ = span + 1, upto do
            pos = pos + 1
            if open then
              if got[pos] then open = false else count = count + 1 end
            end
          end
          e[side - 2], e[side] = count, open and not closes
        end
      end
    end
    span = upto
  end
end
