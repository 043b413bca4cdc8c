"""The auth matrix: every route × every role × own/other tenant, plus missing, malformed and
revoked keys. The expected table is written out here by hand (from the issue), not derived
from engine/permissions.py, so a wrong permission table fails this test."""

from __future__ import annotations

import itertools

import pytest

from api.app import routes
from api.openapi import openapi_document
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)

ALL = {"p1", "p2", "vendor", "vendor-other", "ops", "admin", "system"}
PARTNERS, VENDORS = {"p1", "p2"}, {"vendor", "vendor-other"}
# Keys that belong to another tenant than the reservation (made by p1 on v-confirm).
OTHER_TENANT = {"p2", "vendor-other"}

# route name -> roles (key names) allowed to perform it
ALLOWED = {
    "create": PARTNERS | {"system"},
    "read": ALL,
    "vendor-confirmation": VENDORS | {"system"},
    "vendor-authorization": VENDORS | {"system"},
    "requester-authorization": PARTNERS | {"system"},
    "commit": PARTNERS | {"system"},
    "cancel": PARTNERS | VENDORS | {"system"},
    "extend": PARTNERS | {"system"},
    "modify": PARTNERS | {"ops", "admin", "system"},
    "availability": ALL,
    "release": {"ops", "admin", "system"},
    "bulk-release": {"ops", "admin", "system"},
    "audit": {"ops", "admin", "system"},
    "admin-partners": {"admin", "system"},
    "admin-vendors": {"admin", "system"},
    "admin-resources": {"admin", "system"},
    "admin-keys": {"admin", "system"},
    "admin-revoke": {"admin", "system"},
    # payments (issue 12)
    "admin-vendor-terms": {"admin", "system"},
    "booking-cancel": ALL,
}
# Routes on one reservation (tenancy applies) vs. routes with no tenant in the path.
ON_RESERVATION = {"read", "vendor-confirmation", "vendor-authorization",
                  "requester-authorization", "commit", "cancel", "extend", "modify"}
_ids = itertools.count(1)


async def _request(client, world, route: str, key: str | None, rid: str):
    n = next(_ids)
    headers = world.auth(key) if key else {}
    if route == "create":
        return await client.post("/v1/reservations", json=create_body(start=600 + 60 * n),
                                 headers=headers)
    if route == "read":
        return await client.get(f"/v1/reservations/{rid}", headers=headers)
    if route == "modify":
        return await client.post(f"/v1/reservations/{rid}/modify",
                                 json={"slotStartTime": at(99_960 + 60 * n),
                                       "slotEndTime": at(100_020 + 60 * n)}, headers=headers)
    if route in ON_RESERVATION:
        return await client.post(f"/v1/reservations/{rid}/{route}", headers=headers)
    if route == "availability":
        return await client.get("/v1/vendors/v-confirm/availability",
                                params={"startTime": at(0), "endTime": at(60)},
                                headers=headers)
    if route == "release":
        return await client.post(f"/v1/ops/reservations/{rid}/release",
                                 json={"reason": "test"}, headers=headers)
    if route == "bulk-release":
        return await client.post("/v1/ops/releases",
                                 json={"reason": "test", "reservationIds": [rid]},
                                 headers=headers)
    if route == "audit":
        return await client.get("/v1/ops/audit", headers=headers)
    if route == "admin-partners":
        return await client.post("/v1/admin/partners", json={"partnerId": f"np{n}"},
                                 headers=headers)
    if route == "admin-vendors":
        return await client.post("/v1/admin/vendors", json={"vendorId": f"nv{n}"},
                                 headers=headers)
    if route == "admin-resources":
        return await client.post("/v1/admin/resources",
                                 json={"resourceId": f"nr{n}", "vendorId": "v-other"},
                                 headers=headers)
    if route == "admin-keys":
        return await client.post("/v1/admin/keys", json={"role": "ops"}, headers=headers)
    if route == "admin-revoke":
        return await client.post("/v1/admin/keys/key_nosuchkey/revoke", headers=headers)
    if route == "admin-vendor-terms":
        return await client.patch("/v1/admin/vendors/v-other", json={"refundPolicy": "full"},
                                  headers=headers)
    if route == "booking-cancel":
        return await client.post("/v1/bookings/bkg_nosuchbooking/cancel", headers=headers)
    raise AssertionError(route)


async def _fresh_reservation(client, world) -> str:
    r = await client.post("/v1/reservations", json=create_body(start=60 * next(_ids)),
                          headers=world.auth("p1"))
    assert r.status_code == 201, r.text
    return r.json()["reservationId"]


async def test_auth_matrix(client, world):
    failures = []
    for route, allowed in ALLOWED.items():
        for key in sorted(ALL):
            rid = await _fresh_reservation(client, world)
            r = await _request(client, world, route, key, rid)
            if key not in allowed:
                expected = {403}
            elif route in ON_RESERVATION and key in OTHER_TENANT:
                expected = {404}
            elif route == "availability" and key == "vendor-other":
                expected = {404}  # a vendor key reads its own vendor only
            elif route in ("admin-revoke", "booking-cancel"):
                expected = {404}  # allowed; the key (booking) does not exist
            else:
                expected = {200, 201, 202, 409}  # allowed (409: the state refuses the action)
            if r.status_code not in expected:
                failures.append((route, key, r.status_code, r.text[:160]))
            if r.status_code in (403, 404):
                assert set(r.json()["error"]) == {"code", "message", "details", "retryable",
                                                  "retryAfter"}
    assert failures == []


async def test_other_tenants_reservation_is_indistinguishable_from_missing(client, world):
    rid = await _fresh_reservation(client, world)
    missing = rid[:-4] + ("AAAA" if not rid.endswith("AAAA") else "BBBB")
    for key in ("p2", "vendor-other"):
        theirs = await client.get(f"/v1/reservations/{rid}", headers=world.auth(key))
        nothing = await client.get(f"/v1/reservations/{missing}", headers=world.auth(key))
        assert theirs.status_code == nothing.status_code == 404
        assert theirs.json() == {**nothing.json(), "error": {
            **nothing.json()["error"], "details": {"reservationId": rid}}}


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer sg_live_nope",
                                    "Bearer sg_live_000000000000_" + "x" * 43])
async def test_missing_or_invalid_key_is_401(client, world, header):
    headers = {"Authorization": header} if header else {}
    r = await client.get("/v1/ops/audit", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "UNAUTHENTICATED"


async def test_tampered_secret_is_401(client, world):
    key = world.keys["ops"]
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    r = await client.get("/v1/ops/audit", headers={"Authorization": f"Bearer {tampered}"})
    assert r.status_code == 401


async def test_revoked_key_stops_working_after_the_cache(app, client, world):
    svc = app.state.services
    r = await client.post("/v1/admin/keys", json={"role": "ops"}, headers=world.auth("admin"))
    assert r.status_code == 201
    issued = r.json()
    headers = {"Authorization": f"Bearer {issued['key']}"}
    assert (await client.get("/v1/ops/audit", headers=headers)).status_code == 200
    r = await client.post(f"/v1/admin/keys/{issued['keyId']}/revoke",
                          headers=world.auth("admin"))
    assert r.status_code == 200 and r.json()["revoked"] is True
    svc.api_keys._cache.clear()  # noqa: SLF001  (the cache interval, without the wait)
    assert (await client.get("/v1/ops/audit", headers=headers)).status_code == 401


def test_every_route_is_in_the_matrix_and_the_document():
    """A route added without an auth decision or without documentation fails here."""
    documented = set(openapi_document()["paths"])
    served = set()
    for route in routes():
        for sub in getattr(route, "routes", None) or [route]:
            prefix = route.path if sub is not route else ""
            served.add(prefix + sub.path)
    assert served == documented
    # The Stripe webhook takes no API key: its signature authenticates it (issue 12).
    public = {"/health/live", "/health/ready", "/metrics", "/openapi.json",
              "/v1/stripe/webhook"}
    assert len(served - public) == len(ALLOWED)
