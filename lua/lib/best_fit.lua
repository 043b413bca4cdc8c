--@include lib/unit_key.lua
-- Best fit (issue 16): the candidate {rs, f, l} whose stay [f, l] is free (a unit held by
-- `owner` counts as free) and whose free gap around it is smallest: free units just before f
-- plus free units just after l, each side counted up to `window`; ties to the earlier
-- candidate; nil when no candidate is free. The least fragmentation the hold can leave.
--
-- Read in rounds, one MGET per round (in chunks), never a call per unit: round 0 reads every
-- candidate's stay and its two neighbours (f - 1, l + 1); both neighbours taken is a perfect
-- fit (gap 0), and the first one wins at once. Then each round doubles the span read on the
-- sides still open (2, 3-4, 5-8, ... up to `window`), only for the candidates that can still
-- win: one whose gap so far (a lower bound) is above the best exact gap found, or equal to
-- it but later in order, is dropped unread.
local function best_fit(unit_root, candidates, owner, window)
  local function mget(keys)  -- MGET in chunks (unpack has a C-stack limit)
    local out, n = {}, 0
    for from = 1, #keys, 1000 do
      local part = redis.call('MGET', unpack(keys, from, math.min(#keys, from + 999)))
      for i = 1, #part do n = n + 1; out[n] = part[i] end
    end
    return out
  end

  local keys, n = {}, 0
  for _, c in ipairs(candidates) do
    c.prefix = unit_root .. c.rs .. ':'
    for i = c.f - 1, c.l + 1 do n = n + 1; keys[n] = c.prefix .. i end
  end
  local got = mget(keys)
  -- Per contender: side counts so far (lc, rc), whether each side is still open, how far
  -- each side has been read (ld, rd).
  local live, m, pos = {}, 0, 0
  for order, c in ipairs(candidates) do
    local free = true
    for i = 1, c.l - c.f + 1 do
      local holder = got[pos + 1 + i]
      if holder and holder ~= owner then free = false; break end
    end
    if free then
      local before, after = got[pos + 1], got[pos + c.l - c.f + 3]
      -- Gap 0 (both neighbours taken, or no window): nothing earlier had it, nothing beats it.
      if window <= 0 or (before and after) then return c end
      m = m + 1
      live[m] = {c = c, order = order, lc = before and 0 or 1, rc = after and 0 or 1,
        lo = not before and window > 1, ro = not after and window > 1}
    end
    pos = pos + c.l - c.f + 3
  end
  if m == 0 then return nil end

  local span = 1  -- distance read so far on an open side
  while true do
    -- The best exact gap so far (both sides closed), ties to the earlier candidate.
    local best
    for _, e in ipairs(live) do
      if not e.lo and not e.ro then
        local gap = e.lc + e.rc
        if not best or gap < best.gap or (gap == best.gap and e.order < best.order) then
          best = {gap = gap, order = e.order, e = e}
        end
      end
    end
    -- Keep only who can still win; read the next span of their open sides.
    local keep, k = {}, 0
    for _, e in ipairs(live) do
      local bound = e.lc + e.rc
      if e == (best and best.e) or not best or bound < best.gap
          or (bound == best.gap and e.order < best.order) then
        k = k + 1; keep[k] = e
      end
    end
    live = keep
    local reads, r = {}, 0
    local upto = math.min(window, 2 * span)
    for _, e in ipairs(live) do
      if e.lo then
        for d = span + 1, upto do r = r + 1; reads[r] = e.c.prefix .. (e.c.f - d) end
      end
      if e.ro then
        for d = span + 1, upto do r = r + 1; reads[r] = e.c.prefix .. (e.c.l + d) end
      end
    end
    if r == 0 then return best and best.e.c or live[1].c end
    got = mget(reads)
    pos = 0
    for _, e in ipairs(live) do
      for _, side in ipairs({'l', 'r'}) do
        if e[side .. 'o'] then
          local count = e[side .. 'c']
          local open = true
          for d = span + 1, upto do
            pos = pos + 1
            if open then
              if got[pos] then open = false else count = count + 1 end
            end
          end
          e[side .. 'c'] = count
          e[side .. 'o'] = open and upto < window
        end
      end
    end
    span = upto
  end
end
