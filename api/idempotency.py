"""Idempotency over HTTP: one partner, one ``Idempotency-Key``, one response.

The first request with a key claims it and runs; its response (success, or a definite
client error such as a 409 conflict) is stored and replayed byte for byte to every retry
with the same body, marked ``Idempotent-Replayed: true``. A retry with a different body is a
422 ``IDEMPOTENCY_KEY_MISMATCH``; a retry while the first still runs is a retryable 409
``IDEMPOTENCY_KEY_IN_PROGRESS``. Answers the client should simply retry (429, 5xx, a lost
backing service) are not stored: the claim is abandoned so the retry runs for real.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response

from api.errors import engine_error_response, status_of
from api.validation import invalid
from engine import metrics
from engine.errors import EngineError
from engine.idempotency import IdempotencyStore, check_key, fingerprint

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


def _stored(status: int) -> bool:
    return status < 500 and status != 429


async def run_once(store: IdempotencyStore, partner_id: str, key: str | None, method: str,
                   path: str, body: dict[str, Any],
                   produce: Callable[[], Awaitable[Response]]) -> Response:
    if key is None:
        return await produce()
    # The key itself is not part of what must match; where it was sent from does not matter.
    canonical = {k: v for k, v in body.items() if k != "idempotencyKey"}
    fp = fingerprint(method, path, canonical)
    stored = await store.begin(partner_id, key, fp)
    if stored is not None:
        metrics.IDEMPOTENT_REPLAYS.inc()
        return Response(stored.body_bytes, status_code=stored.status,
                        media_type="application/json", headers={REPLAY_HEADER: "true"})
    try:
        response = await produce()
    except EngineError as exc:
        if not _stored(status_of(exc)):
            await store.abandon(partner_id, key, fp)
            raise
        response = engine_error_response(exc)
    except BaseException:
        await store.abandon(partner_id, key, fp)
        raise
    if _stored(response.status_code):
        await store.complete(partner_id, key, fp, response.status_code, response.body)
    else:
        await store.abandon(partner_id, key, fp)
    return response
