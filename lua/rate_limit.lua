--[[ Admit or refuse one request against a GCRA limiter (partner or client IP).
  KEYS[1] <prefix>{sg:p:<partner>}:rate or <prefix>{sg:ip:<ip>}:rate   -- TAT, integer us
  ARGV[1] rate per minute (>= 1); emission interval T = 60e6 / rate us, rounded to the us
  ARGV[2] burst (>= 1): requests that may pass at once from a rested limiter
  ARGV[3] cost of this request in requests (>= 1, <= burst; default 1)
  Returns: {1, remaining} when admitted (remaining = requests that could still pass now)
  Errors (negative integers): -12 RATE_LIMITED (+ retry_after_ms: the wait until this request
           would pass, rounded up), -2 INVALID (+ reason)
]]
--@include @outcomes
--@include lib/now_us.lua

-- GCRA (generic cell rate algorithm, as in rwz/redis-gcra and go-redis/redis_rate) kept in
-- integer microseconds so that "exactly `burst` at once" holds without float drift.
-- The TAT is written with string.format('%d'): tostring() of a Lua number keeps only 14
-- significant digits, which would lose ~100 us of a 16-digit microsecond timestamp.
local key = KEYS[1]
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost = tonumber(ARGV[3] or '1')

if not rate or not burst or not cost then return {OUTCOME.INVALID, 'non-numeric argument'} end
if rate < 1 or rate ~= math.floor(rate) then return {OUTCOME.INVALID, 'rate must be a positive integer'} end
if burst < 1 or burst ~= math.floor(burst) then return {OUTCOME.INVALID, 'burst must be a positive integer'} end
if cost < 1 or cost ~= math.floor(cost) then return {OUTCOME.INVALID, 'cost must be a positive integer'} end
if cost > burst then return {OUTCOME.INVALID, 'cost exceeds burst: it could never pass'} end

local interval = math.max(1, math.floor(60000000 / rate + 0.5))
local burst_offset = interval * burst
local now = now_us()

local tat = tonumber(redis.call('GET', key) or '0') or 0
if tat < now then tat = now end

local new_tat = tat + interval * cost
local allow_at = new_tat - burst_offset
if now < allow_at then
  return {OUTCOME.RATE_LIMITED, math.ceil((allow_at - now) / 1000)}
end

-- After new_tat the limiter is fully rested again, so the key may vanish then.
local recovery_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', key, string.format('%d', new_tat), 'PX', recovery_ms)
return {OUTCOME.OK, math.floor((burst_offset - (new_tat - now)) / interval)}
