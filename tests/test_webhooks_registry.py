"""Webhook endpoints over HTTP (issue 14): register, read, change, rotate, delete; tenancy;
bad input answers a typed 4xx and changes nothing."""

from __future__ import annotations

import asyncpg
import pytest

from tests.test_api_fixtures import app, client, migrated, world  # noqa: F401  (fixtures)
from tests.webhook_fixtures import api_settings  # noqa: F401  (fixture)

HOOK = "http://127.0.0.1:9/hook"


async def endpoint_rows(pool: asyncpg.Pool) -> list[tuple]:
    async with pool.acquire() as conn:
        return [tuple(r) for r in await conn.fetch(
            "SELECT id, owner_kind, owner_id, url, events, description, secret, disabled, "
            "previous_secret FROM webhook_endpoints ORDER BY id")]


async def test_register_read_update_rotate_delete(client, world, app):
    r = await client.post("/v1/webhook-endpoints", headers=world.auth("p1"),
                          json={"url": HOOK, "events": ["reservation.expired"],
                                "description": "expiry feed"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["id"].startswith("whe_") and created["secret"].startswith("whsec_")
    assert created["events"] == ["reservation.expired"] and created["disabled"] is False
    eid = created["id"]

    r = await client.get(f"/v1/webhook-endpoints/{eid}", headers=world.auth("p1"))
    assert r.status_code == 200 and "secret" not in r.json()
    assert r.json()["description"] == "expiry feed"
    r = await client.get("/v1/webhook-endpoints", headers=world.auth("p1"))
    assert [e["id"] for e in r.json()["data"]] == [eid]

    r = await client.patch(f"/v1/webhook-endpoints/{eid}", headers=world.auth("p1"),
                           json={"events": "*", "disabled": True})
    assert r.status_code == 200, r.text
    assert r.json()["events"] == ["*"] and r.json()["disabled"] is True
    assert r.json()["url"] == HOOK

    r = await client.post(f"/v1/webhook-endpoints/{eid}/rotate-secret",
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["secret"] != created["secret"] and rotated["previousSecretExpiresAt"]
    [row] = await endpoint_rows(app.state.services.pool)
    assert row[6] == rotated["secret"] and row[8] == created["secret"]

    r = await client.delete(f"/v1/webhook-endpoints/{eid}", headers=world.auth("p1"))
    assert r.status_code == 204
    r = await client.get(f"/v1/webhook-endpoints/{eid}", headers=world.auth("p1"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "WEBHOOK_ENDPOINT_NOT_FOUND"


async def test_tenancy_each_key_its_own_endpoints(client, world, app):
    ids = {}
    for name in ("p1", "p2", "vendor", "ops", "admin"):
        r = await client.post("/v1/webhook-endpoints", headers=world.auth(name),
                              json={"url": f"{HOOK}/{name}", "events": ["*"]})
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    rows = {r[0]: (r[1], r[2]) for r in await endpoint_rows(app.state.services.pool)}
    assert rows[ids["p1"]] == ("partner", "p1") and rows[ids["p2"]] == ("partner", "p2")
    assert rows[ids["vendor"]] == ("vendor", "v-confirm")
    assert rows[ids["ops"]] == ("ops", "") and rows[ids["admin"]] == ("ops", "")
    # ops and admin share the ops endpoints; nobody sees another tenant's
    r = await client.get("/v1/webhook-endpoints", headers=world.auth("ops"))
    assert sorted(e["id"] for e in r.json()["data"]) == sorted([ids["ops"], ids["admin"]])
    before = await endpoint_rows(app.state.services.pool)
    for caller, other in (("p2", "p1"), ("vendor-other", "vendor"), ("p1", "ops"),
                          ("ops", "p1")):
        eid = ids[other]
        for method, path, body in (
                ("GET", f"/v1/webhook-endpoints/{eid}", None),
                ("PATCH", f"/v1/webhook-endpoints/{eid}", {"disabled": True}),
                ("DELETE", f"/v1/webhook-endpoints/{eid}", None),
                ("POST", f"/v1/webhook-endpoints/{eid}/rotate-secret", None),
                ("POST", f"/v1/webhook-endpoints/{eid}/test", None),
                ("GET", f"/v1/webhook-endpoints/{eid}/deliveries", None)):
            r = await client.request(method, path, headers=world.auth(caller), json=body)
            assert r.status_code == 404, (caller, method, path, r.text)
            assert r.json()["error"]["code"] == "WEBHOOK_ENDPOINT_NOT_FOUND"
    assert await endpoint_rows(app.state.services.pool) == before


@pytest.mark.parametrize("body, code", [
    ({"url": "not a url", "events": ["*"]}, "INVALID_URL"),
    ({"url": "ftp://example.com/x", "events": ["*"]}, "INVALID_URL"),
    ({"url": "http:///nohost", "events": ["*"]}, "INVALID_URL"),
    ({"url": "http://user:pw@example.com/x", "events": ["*"]}, "INVALID_URL"),
    ({"url": "http://example.com:99999/x", "events": ["*"]}, "INVALID_URL"),
    ({"url": HOOK, "events": ["reservation.exploded"]}, "UNKNOWN_EVENT_TYPE"),
    ({"url": HOOK, "events": ["*", "reservation.expired"]}, "UNKNOWN_EVENT_TYPE"),
    ({"url": HOOK, "events": []}, "INVALID_EVENTS"),
    ({"url": HOOK, "events": "all"}, "INVALID_EVENTS"),
    ({"url": HOOK, "events": [1]}, "INVALID_FIELD_TYPE"),
    ({"url": HOOK, "events": ["*"], "description": "x" * 501}, "INVALID_FIELD"),
    ({"url": HOOK, "events": ["*"], "secret": "whsec_mine"}, "UNKNOWN_FIELD"),
    ({"events": ["*"]}, "MISSING_FIELD"),
])
async def test_bad_input_is_refused_and_changes_nothing(client, world, app, body, code):
    r = await client.post("/v1/webhook-endpoints", headers=world.auth("p1"),
                          json={"url": HOOK, "events": ["*"]})
    eid = r.json()["id"]
    before = await endpoint_rows(app.state.services.pool)
    r = await client.post("/v1/webhook-endpoints", headers=world.auth("p1"), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    if code != "MISSING_FIELD":  # PATCH takes any subset of the fields
        r = await client.patch(f"/v1/webhook-endpoints/{eid}", headers=world.auth("p1"),
                               json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code
    assert await endpoint_rows(app.state.services.pool) == before


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/x", "http://localhost/x", "https://10.1.2.3/x",
    "http://192.168.0.10/x", "http://169.254.169.254/latest", "http://[::1]:80/x",
    "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x", "http://foo.localhost/x",
])
async def test_private_targets_are_refused_unless_allowed(app, client, world, url):
    from engine.webhook_service import WebhookService

    strict = WebhookService(app.state.services.pool,
                            app.state.services.settings.replace(webhook_allow_private=False))
    app.state.services.webhooks = strict
    before = await endpoint_rows(app.state.services.pool)
    r = await client.post("/v1/webhook-endpoints", headers=world.auth("p1"),
                          json={"url": url, "events": ["*"]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "WEBHOOK_URL_PRIVATE"
    assert await endpoint_rows(app.state.services.pool) == before
    # the same URL is accepted where private targets are allowed (SLOTGUARD_WEBHOOK_ALLOW_PRIVATE)
    app.state.services.webhooks = WebhookService(app.state.services.pool,
                                                 app.state.services.settings)
    r = await client.post("/v1/webhook-endpoints", headers=world.auth("p1"),
                          json={"url": url, "events": ["*"]})
    assert r.status_code == 201, r.text


async def test_roles_without_tenancy_are_forbidden_nothing_else(client, world):
    # every role may manage its own endpoints; an unknown key is 401
    r = await client.get("/v1/webhook-endpoints",
                         headers={"Authorization": "Bearer sg_live_nope_nope"})
    assert r.status_code == 401
    r = await client.get("/v1/webhook-endpoints/whe_nope", headers=world.auth("system"))
    assert r.status_code == 404


@pytest.mark.parametrize("params, code", [
    ({"limit": "0"}, "INVALID_FIELD"), ({"limit": "101"}, "INVALID_FIELD"),
    ({"limit": "x"}, "INVALID_FIELD"), ({"cursor": "0"}, "INVALID_CURSOR"),
    ({"cursor": "ZDox"[:-1]}, "INVALID_CURSOR"), ({"status": "lost"}, "INVALID_FIELD"),
    ({"colour": "red"}, "UNKNOWN_PARAMETER"),
])
async def test_delivery_log_bad_queries(client, world, params, code):
    r = await client.post("/v1/webhook-endpoints", headers=world.auth("p1"),
                          json={"url": HOOK, "events": ["*"]})
    eid = r.json()["id"]
    r = await client.get(f"/v1/webhook-endpoints/{eid}/deliveries", headers=world.auth("p1"),
                         params=params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    # another tenant asking with the same bad query learns nothing but "not found"
    r = await client.get(f"/v1/webhook-endpoints/{eid}/deliveries", headers=world.auth("p2"),
                         params=params)
    assert r.status_code == 404
