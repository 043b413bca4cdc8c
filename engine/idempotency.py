"""Idempotency keys: one partner, one key, one request, one response.

A request that carries an ``Idempotency-Key`` first calls :meth:`IdempotencyStore.begin`
with its fingerprint (sha256 of the canonical request):

- the key is free: it is claimed (in progress, for ``idempotency_lock_ms``) and ``begin``
  returns ``None``: do the work, then :meth:`complete` with the response, or
  :meth:`abandon` when the work failed in a way the client may retry;
- the same request already completed: ``begin`` returns its :class:`StoredResponse` to
  replay unchanged;
- the key was used for a different request: :class:`IdempotencyMismatch`;
- the same request is still running: :class:`IdempotencyInProgress` with ``retry_after_ms``.

Records are kept ``idempotency_ttl_ms`` (24 h by default) after completion. Records of
refused requests (a 4xx: a conflict, a validation error) cost the client nothing to leave
behind, so they are kept only ``idempotency_refused_ttl_ms`` (60 s by default; 0 keeps none)
and at most ``idempotency_refused_max_per_partner`` of them per partner (the oldest go
first). A retry after a refusal's record is gone runs again, and answers what is true then.
The decision is one Lua call per step on ``{sg:p:<partner>}:idem:<key>``, so concurrent
duplicates cannot both proceed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from engine.access import RedisAccess
from engine.errors import Outcome, ValidationError, error_for
from engine.keys import KeySpace
from engine.limits import check_partner_id
from engine.settings import Settings

MAX_KEY_LENGTH = 255
log = logging.getLogger("slotguard.idempotency")


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: str

    @property
    def body_bytes(self) -> bytes:
        return self.body.encode("utf-8")


def fingerprint(method: str, path: str, body_obj: Any) -> str:
    """sha256 hex of the canonical request: same method, path and JSON value, same print.

    The body is serialized with sorted keys and no insignificant whitespace, so key order
    and formatting of the client's JSON do not change the fingerprint.
    """
    canonical_body = json.dumps(body_obj, sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False, allow_nan=False)
    canonical = "\n".join((method.upper(), path, canonical_body))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_key(key: str) -> str:
    """Idempotency keys are 1..255 printable ASCII characters."""
    # isascii() and isprintable(): exactly 0x20..0x7E, without a Python loop per character.
    if (not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH
            or not key.isascii() or not key.isprintable()):
        raise ValidationError(
            f"an idempotency key is 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            details={"field": "Idempotency-Key"},
        )
    return key


def _check_fingerprint(fp: str) -> str:
    if not isinstance(fp, str) or len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ValidationError("a request fingerprint is a lowercase sha256 hex digest")
    return fp


class IdempotencyStore:
    def __init__(self, access: RedisAccess, keys: KeySpace, settings: Settings) -> None:
        self.access = access
        self.keys = keys
        self.settings = settings

    def _key(self, partner_id: str, key: str, fp: str) -> str:
        check_partner_id(partner_id)
        check_key(key)
        _check_fingerprint(fp)
        return self.keys.idempotency(partner_id, key)

    async def begin(self, partner_id: str, key: str, fingerprint: str) -> StoredResponse | None:
        """Claim the key (``None``: proceed) or return the stored response to replay."""
        redis_key = self._key(partner_id, key, fingerprint)
        reply = await self.access.call("idempotency_begin", [redis_key],
                                       [fingerprint, self.settings.idempotency_lock_ms])
        if int(reply[0]) == Outcome.OK:
            if _text(reply[1]) == "proceed":
                return None
            body = reply[3]
            return StoredResponse(int(reply[2]), _text(body) if body is not None else "")
        raise error_for(reply, details={"idempotencyKey": key})

    async def complete(self, partner_id: str, key: str, fingerprint: str, status: int,
                       body: bytes | str) -> bool:
        """Store the response for replay; False when the same request had already stored one.

        Raises IdempotencyMismatch if the key now belongs to a different request.
        """
        reply = await self.access.call(
            "idempotency_complete", *self._complete_call(partner_id, key, fingerprint, status,
                                                         body))
        if int(reply[0]) == Outcome.OK:
            return int(reply[1]) == 1
        raise error_for(reply, details={"idempotencyKey": key})

    def _complete_call(self, partner_id: str, key: str, fingerprint: str, status: int,
                       body: bytes | str) -> tuple[list, list]:
        redis_key = self._key(partner_id, key, fingerprint)
        if isinstance(body, bytes):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationError("a stored response body must be UTF-8 text") from None
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValidationError("status must be an HTTP status code")
        refused = status >= 400
        ttl_ms = (self.settings.idempotency_refused_ttl_ms if refused
                  else self.settings.idempotency_ttl_ms)
        if refused and self.settings.idempotency_ttl_ms:
            ttl_ms = min(ttl_ms, self.settings.idempotency_ttl_ms)
        return ([redis_key, self.keys.idempotency_refused(partner_id)],
                [fingerprint, status, body, ttl_ms, 1 if refused else 0,
                 self.settings.idempotency_refused_max_per_partner])

    async def abandon(self, partner_id: str, key: str, fingerprint: str) -> bool:
        """Release this request's in-progress claim so the key may be retried at once."""
        redis_key = self._key(partner_id, key, fingerprint)
        reply = await self.access.call("idempotency_abandon", [redis_key], [fingerprint])
        return int(reply[1]) == 1

    # ---- the same, queued but not awaited -----------------------------------------------
    # The call is on the access layer's queue when these return, so every later call of this
    # process (a retry with the same key included) is ordered after it on the connection;
    # the response that caused it does not wait another round trip.
    def complete_soon(self, partner_id: str, key: str, fingerprint: str, status: int,
                      body: bytes | str) -> asyncio.Future:
        return _logged(self.access.call(
            "idempotency_complete", *self._complete_call(partner_id, key, fingerprint, status,
                                                         body)))

    def abandon_soon(self, partner_id: str, key: str, fingerprint: str) -> asyncio.Future:
        redis_key = self._key(partner_id, key, fingerprint)
        return _logged(self.access.call("idempotency_abandon", [redis_key], [fingerprint]))


def _logged(future: asyncio.Future) -> asyncio.Future:
    def done(f: asyncio.Future) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.warning("idempotency bookkeeping failed: %r", f.exception())
    future.add_done_callback(done)
    return future


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
