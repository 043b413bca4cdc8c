"""API keys: issuing, storing as a digest, and resolving ``Authorization: Bearer`` headers.

A key reads ``sg_live_<prefix>_<secret>``: the prefix is public (it names the key in logs
and in the ``api_keys`` row), the secret is 256 random bits. Only the sha256 digest of the
whole key is stored; plaintext never lands anywhere, and it is shown once, at creation.
A fast digest is right here (unlike passwords): the secret is random, not guessable.

Lookups on the hot path are cached per prefix for ``api_key_cache_ms``, so a revoked key
stops working within that interval; the digest is compared on every request.
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


class KeyResolver:
    """Bearer header -> Principal, with a short per-prefix cache of the key row."""

    def __init__(self, pool: asyncpg.Pool, cache_ms: int) -> None:
        self.pool = pool
        self.cache_s = cache_ms / 1000
        self._cache: dict[str, tuple[float, directory.ApiKey | None]] = {}

    async def principal(self, authorization: str | None) -> Principal:
        if not authorization:
            raise unauthenticated("missing Authorization: Bearer <api key>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the Authorization header must be 'Bearer <api key>'")
        token = token.strip()
        match = _KEY_RE.match(token)
        if match is None:
            raise unauthenticated("invalid API key")
        row = await self._row(match.group(1))
        if row is None or row.revoked or not hmac.compare_digest(row.digest, digest(token)):
            raise unauthenticated("invalid or revoked API key")
        return Principal(row.id, row.role, row.partner_id, row.vendor_id)

    async def _row(self, prefix: str) -> directory.ApiKey | None:
        now = clock.monotonic()
        cached = self._cache.get(prefix)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        async with self.pool.acquire() as conn:
            row = await directory.find_api_key(conn, prefix)
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[prefix] = (now, row)
        return row
