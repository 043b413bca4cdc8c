--[[ Accept a transfer offer (issue 16): in ONE script check the token, the offer's addressee,
  the live pre-commit state and the version, then hand the hold to the caller: the record's
  partner changes, version + 1, the offer is spent, and ONE history/commit-queue entry
  (fromState = toState, reason 'transferred') names both partners. The units keep their
  owner (the reservation id), so nothing else moves. With ARGV[6] = '1' every check runs and
  nothing is written (the caller takes the new partner's cap slot in between, lua/cap_*.lua).
  KEYS[1] <prefix>{sg:<shard>}:r:<id>    reservation record
  KEYS[2] <prefix>{sg:<shard>}:rh:<id>   reservation history
  KEYS[3] <prefix>{sg:<shard>}:xo:<id>   its transfer offer
  KEYS[4] <prefix>{sg:<shard>}:events    the shard's commit-queue stream
  ARGV[1] reservation id
  ARGV[2] token digest (SHA-256 hex)
  ARGV[3] the caller's partner id (the new holder)
  ARGV[4] expected version ('' = any)
  ARGV[5] metadata (JSON object text; the partners are added under "transfer")
  ARGV[6] '1': check only, write nothing
  Returns: {1, state, version, deadline_ms, previous partner id, {field, value, ...},
           {history JSON, ...}} (check only: the first five)
  Errors (negative integers): -2 INVALID (+ reason), -35 TRANSFER_TOKEN_INVALID (no offer,
           another token, expired, or the hold changed hands since the offer; also when the
           reservation does not exist), -36 TRANSFER_TOKEN_USED, -37 TRANSFER_WRONG_PARTNER,
           -38 TRANSFER_TO_SELF, -9 VERSION_MISMATCH (+ current version), -11 TERMINAL
           (+ state), -8 INVALID_TRANSITION (+ state), -16 EXPIRED (+ state, + version:
           overdue; nothing is written, the reaper records it)
]]
--@include @outcomes
--@include @lifecycle
--@include lib/now_ms.lua
--@include lib/load_reservation.lua
--@include lib/emit_transition.lua

local record_key, history_key, offer_key, events_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, digest, caller = ARGV[1], ARGV[2], ARGV[3]
local ok_md, metadata = pcall(cjson.decode, ARGV[5])
if not ok_md or type(metadata) ~= 'table' then return {OUTCOME.INVALID, 'metadata is not JSON'} end
if not caller or caller == '' then return {OUTCOME.INVALID, 'no caller'} end

local offer = redis.call('HMGET', offer_key, 'd', 'to', 'from', 'x', 'u')
local now = now_ms()
if not offer[1] or offer[1] ~= digest or tonumber(offer[4]) <= now then
  return {OUTCOME.TRANSFER_TOKEN_INVALID}
end
if offer[5] == '1' then return {OUTCOME.TRANSFER_TOKEN_USED} end
local rec = load_reservation(record_key, id)
if not rec or rec.p ~= offer[3] then return {OUTCOME.TRANSFER_TOKEN_INVALID} end
if offer[2] ~= '' and offer[2] ~= caller then return {OUTCOME.TRANSFER_WRONG_PARTNER} end
if rec.p == caller then return {OUTCOME.TRANSFER_TO_SELF} end
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= rec.v then return {OUTCOME.VERSION_MISMATCH, rec.v} end
if TERMINAL[rec.st] then return {OUTCOME.TERMINAL, rec.st} end
if not PRE_COMMIT[rec.st] then return {OUTCOME.INVALID_TRANSITION, rec.st} end
if rec.dl <= now then return {OUTCOME.EXPIRED, rec.st, rec.v} end
if ARGV[6] == '1' then return {OUTCOME.OK, rec.st, rec.v, rec.dl, rec.p} end

local previous = rec.p
local v = rec.v + 1
metadata['transfer'] = {fromPartnerId = previous, toPartnerId = caller}
redis.call('HSET', record_key, 'p', caller, 'v', v)
redis.call('HSET', offer_key, 'u', '1', 'by', caller)
emit_transition(events_key, history_key, rec, rec.st, {rec.st}, v, 'partner', 'transferred',
  cjson.encode(metadata), '', now, rec.dl, false,
  {'transferredFromPartnerId', previous, 'transferredToPartnerId', caller})
return {OUTCOME.OK, rec.st, v, rec.dl, previous, redis.call('HGETALL', record_key),
  redis.call('LRANGE', history_key, 0, -1)}
