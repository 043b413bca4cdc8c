"""Item 9 of issue 11: X-Forwarded-For is honoured only from SLOTGUARD_TRUSTED_PROXIES (the
right-most untrusted address), garbage never switches the per-IP limit off; failed
authentications are limited per IP (429 + Retry-After) and an unknown key is looked up in
Postgres once, not on every try."""

from __future__ import annotations

import httpx
import pytest

from engine.settings import Settings
from tests.test_api_fixtures import app, migrated, world  # noqa: F401  (fixtures)

IP_BURST = 3
AUTH_BURST = 5


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    # Limiters that refill once a minute: a test never waits for a refill.
    return settings.replace(ip_rate_burst=IP_BURST, ip_rate_per_minute=1,
                            partner_rate_burst=1_000, partner_rate_per_minute=600_000,
                            auth_failure_burst=AUTH_BURST, auth_failure_rate_per_minute=1,
                            trusted_proxies="10.9.0.0/16, fd00::1")


def client_from(app, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://slotguard.test")


async def statuses(client, headers, n: int) -> list[int]:
    return [(await client.get("/v1/ops/audit", headers=headers)).status_code for _ in range(n)]


async def limited_ip(client, headers) -> str:
    """Spend the IP burst and answer the client IP the refusal names."""
    codes = await statuses(client, headers, IP_BURST)
    assert codes == [200] * IP_BURST
    r = await client.get("/v1/ops/audit", headers=headers)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    return r.json()["error"]["details"]["clientIp"]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(app, world):
    async with client_from(app, "192.0.2.10") as client:
        ops = world.auth("ops")
        # Each request claims another client; the limit still counts the peer.
        for i, value in enumerate(["203.0.113.1", "garbage", "203.0.113.2"]):
            r = await client.get("/v1/ops/audit",
                                 headers={**ops, "X-Forwarded-For": value})
            assert r.status_code == 200, (i, r.text)
        r = await client.get("/v1/ops/audit", headers={**ops, "X-Forwarded-For": "198.51.100.9"})
        assert r.status_code == 429
        assert r.json()["error"]["details"]["clientIp"] == "192.0.2.10"


async def test_trusted_proxy_forwards_the_right_most_untrusted_address(app, world):
    ops = world.auth("ops")
    async with client_from(app, "10.9.1.1") as proxy:
        # A client's own spoofed entry sits left of the real one: the right-most untrusted
        # address (the one our proxy saw) is the client.
        chain = {**ops, "X-Forwarded-For": "1.1.1.1, 203.0.113.50, 10.9.7.7"}
        assert await limited_ip(proxy, chain) == "203.0.113.50"
        # Another client behind the same proxy has a limiter of its own.
        other = {**ops, "X-Forwarded-For": "203.0.113.51"}
        assert (await proxy.get("/v1/ops/audit", headers=other)).status_code == 200
        # Garbage from a trusted proxy: the client is the last trusted hop, still limited.
        garbage = {**ops, "X-Forwarded-For": "not-an-ip, 10.9.3.3"}
        assert await limited_ip(proxy, garbage) == "10.9.3.3"
        # No header: the proxy itself.
        assert await limited_ip(proxy, ops) == "10.9.1.1"


async def test_failed_authentications_are_limited_per_ip(app, world):
    resolver = app.state.services.api_keys
    unknown = "sg_live_0123456789ab_" + "A" * 43
    async with client_from(app, "192.0.2.77") as client:
        bad = {"Authorization": f"Bearer {unknown}"}
        assert (await client.get("/v1/ops/audit", headers=world.auth("ops"))).status_code == 200
        before = resolver.lookups
        codes = [(await client.get("/v1/ops/audit", headers=bad)).status_code
                 for _ in range(AUTH_BURST)]
        assert codes == [401] * AUTH_BURST
        assert resolver.lookups == before + 1  # the unknown key's digest is remembered
        r = await client.get("/v1/ops/audit", headers=bad)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "RATE_LIMITED"
        # Now every unknown key from this IP is refused before any lookup.
        fresh = {"Authorization": "Bearer sg_live_ba9876543210_" + "B" * 43}
        r = await client.get("/v1/ops/audit", headers=fresh)
        assert r.status_code == 429 and resolver.lookups == before + 1
        # A valid key the process already knows still works from there.
        assert (await client.get("/v1/ops/audit", headers=world.auth("ops"))).status_code == 200
    async with client_from(app, "192.0.2.78") as elsewhere:  # another IP is not affected
        r = await elsewhere.get("/v1/ops/audit", headers=bad)
        assert r.status_code == 401
