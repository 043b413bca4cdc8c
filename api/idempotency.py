"""Idempotency over HTTP: one partner, one ``Idempotency-Key``, one response.

The first request with a key claims it and runs; its response (success, or a definite
client error such as a 409 conflict) is stored and replayed byte for byte to every retry
with the same body, marked ``Idempotent-Replayed: true``. A retry with a different body is a
422 ``IDEMPOTENCY_KEY_MISMATCH``; a retry while the first still runs is a retryable 409
``IDEMPOTENCY_KEY_IN_PROGRESS``. Answers the client should simply retry (429, 5xx, a lost
backing service) are not stored: the claim is abandoned so the retry runs for real.

The claim rides in the creation's first Redis round trip (engine/service.py); this module
only reads the key from the request.
"""

from __future__ import annotations

from typing import Any

from api.validation import invalid
from engine.errors import EngineError
from engine.idempotency import check_key

REPLAY_HEADER = "Idempotent-Replayed"


def key_of(header: str | None, body: dict[str, Any]) -> str | None:
    """The key from the header or the body's ``idempotencyKey``; both must agree."""
    body_key = body.get("idempotencyKey")
    if header is not None and body_key is not None and header != body_key:
        raise invalid("IDEMPOTENCY_KEY_CONFLICT",
                      "the Idempotency-Key header and body idempotencyKey differ",
                      "idempotencyKey")
    key = header if header is not None else body_key
    if key is not None:
        try:
            check_key(key)
        except EngineError as exc:
            raise invalid("INVALID_IDEMPOTENCY_KEY", exc.message, "Idempotency-Key") from None
    return key
