"""Item 7 of issue 11: records of refused requests are bounded. 1,000 distinct
Idempotency-Keys that each meet a 409 leave at most the per-partner cap of records, each
living at most the short TTL; a success keeps the long TTL; a recent refusal still replays."""

from __future__ import annotations

import asyncio

import pytest

from engine.settings import Settings
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)

CAP = 100
REFUSED_TTL_MS = 60_000


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=5_000, ip_rate_burst=5_000,
                            partner_rate_per_minute=600_000, ip_rate_per_minute=1_200_000,
                            idempotency_refused_max_per_partner=CAP,
                            idempotency_refused_ttl_ms=REFUSED_TTL_MS)


async def records(redis, prefix: str, partner: str) -> list[str]:
    return [k async for k in redis.scan_iter(match=f"{prefix}{{sg:p:{partner}}}:idem:*",
                                             count=1000)]


async def test_1000_refused_keys_leave_a_bounded_number_of_short_lived_records(
        client, world, redis, api_settings):
    prefix = api_settings.key_prefix
    ok = await client.post("/v1/reservations", json=create_body(),
                           headers={**world.auth("p2"), "Idempotency-Key": "winner"})
    assert ok.status_code == 201

    async def refused(i: int) -> int:
        r = await client.post("/v1/reservations", json=create_body(),
                              headers={**world.auth("p1"), "Idempotency-Key": f"k-{i}"})
        return r.status_code

    statuses = []
    for chunk in range(0, 1_000, 50):
        statuses += await asyncio.gather(*(refused(i) for i in range(chunk, chunk + 50)))
    assert statuses == [409] * 1_000

    kept = await records(redis, prefix, "p1")
    assert 0 < len(kept) <= CAP
    for key in kept:
        assert 0 < await redis.pttl(key) <= REFUSED_TTL_MS
    index = api_settings.key_prefix + "{sg:p:p1}:idem-refused"
    assert await redis.zcard(index) == len(kept)
    assert 0 < await redis.pttl(index) <= REFUSED_TTL_MS

    # The latest refusal is still replayed, byte for byte.
    again = await client.post("/v1/reservations", json=create_body(),
                              headers={**world.auth("p1"), "Idempotency-Key": "k-999"})
    assert again.status_code == 409 and again.headers["idempotent-replayed"] == "true"
    # A success keeps its record for the long TTL.
    (winner,) = await records(redis, prefix, "p2")
    assert await redis.pttl(winner) > REFUSED_TTL_MS
