"""``SLOTGUARD_METRICS_TOKEN`` (issue 17): who may read ``/metrics``, in the API and the
worker alike. Empty token: everyone (the exposition then belongs on loopback or behind a
proxy); else only ``Authorization: Bearer <token>``, compared in constant time."""

from __future__ import annotations

import hmac


def authorized(authorization: str | None, token: str) -> bool:
    if not token:
        return True
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
