"""API keys: issuing, storing as a digest, and resolving ``Authorization: Bearer`` headers.

A key reads ``sg_live_<prefix>_<secret>``: the prefix is public (it names the key in logs
and in the ``api_keys`` row), the secret is 256 random bits. Only the sha256 digest of the
whole key is stored; plaintext never lands anywhere, and it is shown once, at creation.
A fast digest is right here (unlike passwords): the secret is random, not guessable.

Lookups on the hot path are cached per prefix for ``api_key_cache_ms``, so a revoked key
stops working within that interval; the digest is compared on every request. A key that
failed (unknown, revoked, wrong secret) is remembered by its digest for
``api_key_negative_cache_ms``: asking again costs no Postgres lookup. Keys are random and
made here, so no digest remembered as unknown can become valid later.

Failed authentications are counted per client IP (GCRA, ``auth_failure_rate_per_minute``
and ``auth_failure_burst``); once over, the IP gets 429 with Retry-After instead of 401, and
until then its unknown keys are refused without a lookup (:class:`AuthFailures`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import asyncpg

from api.errors import ApiError
from engine import clock, directory
from engine.errors import RateLimited
from engine.permissions import ROLES, Principal

KEY_PREFIX = "sg_live_"
_KEY_RE = re.compile(r"^sg_live_([a-z0-9]{12})_([A-Za-z0-9_\-]{43})\Z")
MAX_CACHED_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: str  # the plaintext, shown once
    key_id: str
    prefix: str
    digest: str


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> IssuedKey:
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return IssuedKey(key, f"key_{prefix}", prefix, digest(key))


async def issue_key(conn: asyncpg.Connection, role: str, *, partner_id: str | None = None,
                    vendor_id: str | None = None) -> tuple[IssuedKey, directory.ApiKey]:
    """Create and store a key; the caller shows ``IssuedKey.key`` once and forgets it."""
    if role not in ROLES:
        raise ApiError(400, "INVALID_FIELD", f"role must be one of {', '.join(ROLES)}",
                       details={"field": "role"})
    if role != "partner" and partner_id is not None:
        raise ApiError(400, "INVALID_FIELD", "only partner keys name a partner",
                       details={"field": "partnerId"})
    if role != "vendor" and vendor_id is not None:
        raise ApiError(400, "INVALID_FIELD", "only vendor keys name a vendor",
                       details={"field": "vendorId"})
    issued = new_key()
    stored = await directory.insert_api_key(
        conn, key_id=issued.key_id, prefix=issued.prefix, digest=issued.digest, role=role,
        partner_id=partner_id, vendor_id=vendor_id)
    return issued, stored


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "UNAUTHENTICATED", message,
                    headers={"WWW-Authenticate": 'Bearer realm="slotguard"'})


class AuthFailures:
    """Failed authentications per client IP: a shared GCRA in Redis (engine/limits.py),
    and in each process the IPs it saw refused, until their Retry-After passes."""

    def __init__(self) -> None:
        self._blocked: dict[str, float] = {}  # ip -> monotonic time it may try again

    def refuse_if_blocked(self, ip: str) -> None:
        until = self._blocked.get(ip)
        if until is None:
            return
        wait_s = until - clock.monotonic()
        if wait_s <= 0:
            del self._blocked[ip]
            return
        raise _too_many_failures(ip, max(1, int(wait_s * 1000)))

    async def failed(self, limits, ip: str) -> None:
        """Count one failure of ``ip``; RateLimited (429) when it is over its limit."""
        try:
            await limits.check_auth_failures(ip)
        except RateLimited as exc:
            if len(self._blocked) >= MAX_CACHED_KEYS:
                self._blocked.clear()
            self._blocked[ip] = clock.monotonic() + (exc.retry_after_ms or 1000) / 1000
            raise _too_many_failures(ip, exc.retry_after_ms or 1000) from None


def _too_many_failures(ip: str, retry_after_ms: int) -> RateLimited:
    return RateLimited("too many failed authentications from this address",
                       details={"clientIp": ip, "retryAfterMs": retry_after_ms},
                       retry_after_ms=retry_after_ms)


class KeyResolver:
    """Bearer header -> Principal, with a short per-prefix cache of the key row and a
    longer cache of the digests that failed."""

    def __init__(self, pool: asyncpg.Pool, cache_ms: int, negative_cache_ms: int = 60_000
                 ) -> None:
        self.pool = pool
        self.cache_s = cache_ms / 1000
        self.negative_cache_s = negative_cache_ms / 1000
        self._cache: dict[str, tuple[float, directory.ApiKey | None]] = {}
        self._failed: dict[str, float] = {}  # digest -> monotonic time it was remembered
        self.lookups = 0  # Postgres lookups made (the negative cache keeps this flat)
        self.failures = AuthFailures()

    def known(self, authorization: str | None) -> Principal | None:
        """The principal of a header whose key this process has seen valid (no I/O; the
        entry may be stale: a revoked key is still refused by :meth:`principal`), else None.
        An IP blocked for failed authentications may still use such a key."""
        token = _token(authorization)
        match = _KEY_RE.match(token) if token else None
        if match is None:
            return None
        cached = self._cache.get(match.group(1))
        if cached is None or cached[1] is None:
            return None
        row = cached[1]
        if row.revoked or not hmac.compare_digest(row.digest, digest(token)):
            return None
        return Principal(row.id, row.role, row.partner_id, row.vendor_id)

    async def principal(self, authorization: str | None) -> Principal:
        if not authorization:
            raise unauthenticated("missing Authorization: Bearer <api key>")
        token = _token(authorization)
        if token is None:
            raise unauthenticated("the Authorization header must be 'Bearer <api key>'")
        match = _KEY_RE.match(token)
        if match is None:
            raise unauthenticated("invalid API key")
        token_digest = digest(token)
        remembered = self._failed.get(token_digest)
        if remembered is not None:
            if clock.monotonic() - remembered < self.negative_cache_s:
                raise unauthenticated("invalid or revoked API key")
            del self._failed[token_digest]
        row = await self._row(match.group(1))
        if row is None or row.revoked or not hmac.compare_digest(row.digest, token_digest):
            if len(self._failed) >= MAX_CACHED_KEYS:
                self._failed.clear()
            self._failed[token_digest] = clock.monotonic()
            raise unauthenticated("invalid or revoked API key")
        return Principal(row.id, row.role, row.partner_id, row.vendor_id)

    async def _row(self, prefix: str) -> directory.ApiKey | None:
        now = clock.monotonic()
        cached = self._cache.get(prefix)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        self.lookups += 1
        async with self.pool.acquire() as conn:
            row = await directory.find_api_key(conn, prefix)
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[prefix] = (now, row)
        return row


def _token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
