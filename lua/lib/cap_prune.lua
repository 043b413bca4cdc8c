-- Drop the cap entries whose hold has expired: score < now (a hold whose units expire at
-- PXAT x is still alive at x, as Redis expires a key only once now > x).
local function cap_prune(holds_key, now)
  redis.call('ZREMRANGEBYSCORE', holds_key, '-inf', '(' .. now)
end
