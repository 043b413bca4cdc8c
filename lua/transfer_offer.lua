--[[ Offer a live pre-commit hold to another partner (issue 16): store the digest of a one-time
  acceptance token, who may accept it ('' = any partner) and its expiry, under the
  reservation's hash tag. One offer per reservation: a new offer replaces the previous one.
  Nothing else changes (no version bump: an offer is not a transition).
  KEYS[1] <prefix>{sg:<shard>}:r:<id>    reservation record
  KEYS[2] <prefix>{sg:<shard>}:xo:<id>   its transfer offer (hash: d digest, to addressee,
                                         from holder, x expiry, u used)
  ARGV[1] reservation id
  ARGV[2] tenancy: the caller's partner scope; only the holder may offer (others: NOT_FOUND)
  ARGV[3] token digest (SHA-256 hex of the token; the token itself is never stored)
  ARGV[4] addressee partner id ('' = any partner)
  ARGV[5] offer ttl ms
  ARGV[6] expected version ('' = any)
  Returns: {1, offer expires_at_ms, state, version}
  Errors (negative integers): -2 INVALID (+ reason), -4 NOT_FOUND, -8 INVALID_TRANSITION
           (+ state), -9 VERSION_MISMATCH (+ current version), -11 TERMINAL (+ state),
           -16 EXPIRED (+ state, + version: overdue; the reaper records it, nothing is written
           here), -38 TRANSFER_TO_SELF (the addressee holds it)
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/load_reservation.lua

local record_key, offer_key = KEYS[1], KEYS[2]
local id, scope, digest, to = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl = tonumber(ARGV[5])
if not ttl or ttl <= 0 then return {OUTCOME.INVALID, 'ttl must be positive'} end
if not digest or #digest ~= 64 then return {OUTCOME.INVALID, 'bad token digest'} end

local rec = load_reservation(record_key, id)
if not rec or rec.p ~= scope then return {OUTCOME.NOT_FOUND} end
if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= rec.v then return {OUTCOME.VERSION_MISMATCH, rec.v} end
if TERMINAL[rec.st] then return {OUTCOME.TERMINAL, rec.st} end
if not PRE_COMMIT[rec.st] then return {OUTCOME.INVALID_TRANSITION, rec.st} end
if to == rec.p then return {OUTCOME.TRANSFER_TO_SELF} end
local now = now_ms()
if rec.dl <= now then return {OUTCOME.EXPIRED, rec.st, rec.v} end

local expires_at = now + ttl
redis.call('DEL', offer_key)
redis.call('HSET', offer_key, 'd', digest, 'to', to, 'from', rec.p, 'x', expires_at, 'u', '0')
redis.call('PEXPIREAT', offer_key, expires_at)
return {OUTCOME.OK, expires_at, rec.st, rec.v}
