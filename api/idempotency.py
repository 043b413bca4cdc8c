"""Idempotency over HTTP: one partner, one ``Idempotency-Key``, one response.

The first request with a key claims it and runs; its response (success, or a definite
client error such as a 409 conflict) is stored and replayed byte for byte to every retry
with the same body, marked ``Idempotent-Replayed: true``. A retry with a different body is a
422 ``IDEMPOTENCY_KEY_MISMATCH``; a retry while the first still runs is a retryable 409
``IDEMPOTENCY_KEY_IN_PROGRESS``. Answers the client should simply retry (429, 5xx, a lost
backing service) are not stored: the claim is abandoned so the retry runs for real.

The claim rides in the creation's first Redis round trip and the key is checked with the
request's other rules (engine/service.py); this module names the replay header.
"""

from __future__ import annotations


REPLAY_HEADER = "Idempotent-Replayed"
