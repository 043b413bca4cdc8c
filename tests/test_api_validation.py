"""Bad input changes nothing (DESIGN invariant 5): every class of bad request gets a 4xx with
a precise code, and afterwards every Redis key under the test's prefix and every Postgres row
count is exactly what it was."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import snapshot
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    row_counts,
    world,
)

JSON = {"Content-Type": "application/json"}


def body(**changes) -> bytes:
    data = create_body()
    for name, value in changes.items():
        if value is ...:
            data.pop(name)
        else:
            data[name] = value
    return orjson.dumps(data)


CREATE_CASES = [
    # (name, raw body, extra headers, status, code)
    ("malformed json", b'{"vendorId": ', JSON, 400, "MALFORMED_JSON"),
    ("not an object", b"[1, 2]", JSON, 400, "INVALID_BODY"),
    ("empty body", b"", JSON, 400, "MISSING_BODY"),
    ("wrong content type", body(), {"Content-Type": "text/plain"}, 415,
     "UNSUPPORTED_MEDIA_TYPE"),
    ("form content type", b"vendorId=v", {"Content-Type": "application/x-www-form-urlencoded"},
     415, "UNSUPPORTED_MEDIA_TYPE"),
    ("unknown field", body(color="red"), JSON, 400, "UNKNOWN_FIELD"),
    ("wrong type", body(vendorId=5), JSON, 400, "INVALID_FIELD_TYPE"),
    ("bool for string", body(requesterId=True), JSON, 400, "INVALID_FIELD_TYPE"),
    ("metadata not object", body(metadata=[1]), JSON, 400, "INVALID_FIELD_TYPE"),
    ("missing field", body(requesterId=...), JSON, 400, "MISSING_FIELD"),
    ("blank field", body(requesterId="   "), JSON, 400, "INVALID_FIELD"),
    ("naive timestamp", body(slotStartTime="2030-01-01T09:00:00"), JSON, 400,
     "INVALID_TIMESTAMP"),
    ("date only", body(slotStartTime="2030-01-01"), JSON, 400, "INVALID_TIMESTAMP"),
    ("not a time", body(slotEndTime="tomorrow"), JSON, 400, "INVALID_TIMESTAMP"),
    ("impossible date", body(slotStartTime="2030-02-30T09:00:00Z"), JSON, 400,
     "INVALID_TIMESTAMP"),
    ("end before start", body(slotEndTime=at(-15)), JSON, 400, "INVALID_TIME_RANGE"),
    ("end equals start", body(slotEndTime=at(0)), JSON, 400, "INVALID_TIME_RANGE"),
    ("misaligned", body(slotStartTime=at(7)), JSON, 400, "SLOT_NOT_ALIGNED"),
    ("misaligned by offset", body(slotStartTime="2030-01-01T09:00:00+00:07"), JSON, 400,
     "SLOT_NOT_ALIGNED"),
    ("absurd range", body(slotEndTime="2031-01-01T09:00:00Z"), JSON, 400, "SLOT_TOO_LONG"),
    ("oversized body", body(metadata={"pad": "x" * 20_000}), JSON, 413, "BODY_TOO_LARGE"),
    ("metadata too large", body(metadata={"pad": "x" * 5_000}), JSON, 400,
     "METADATA_TOO_LARGE"),
    ("unknown vendor", body(vendorId="nobody"), JSON, 404, "UNKNOWN_VENDOR"),
    ("unknown resource", body(resourceId="no-room"), JSON, 404, "UNKNOWN_RESOURCE"),
    ("another vendor's resource", body(resourceId="v-other"), JSON, 400,
     "RESOURCE_VENDOR_MISMATCH"),
    ("payment vendor", body(vendorId="v-paid"), JSON, 409, "PAYMENT_PROVIDER_UNAVAILABLE"),
    ("idempotency key too long", body(idempotencyKey="k" * 300), JSON, 400,
     "INVALID_FIELD"),
    ("idempotency keys disagree", body(idempotencyKey="a"), {**JSON, "Idempotency-Key": "b"},
     400, "IDEMPOTENCY_KEY_CONFLICT"),
]


@pytest.fixture
async def baseline(app, client, world, redis, migrated):
    """A live reservation to act on, then the state every bad request must leave alone."""
    r = await client.post("/v1/reservations", json=create_body(start=600),
                          headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    before = (await snapshot(redis, migrated.key_prefix),
              await row_counts(app.state.services.pool))
    return rid, before


async def assert_unchanged(app, redis, migrated, before):
    """Same keys, same values, same row counts. A rate limiter's key may only vanish (its
    short TTL ran out while the test ran), never appear or change."""
    keys_before, rows_before = before
    keys_after = await snapshot(redis, migrated.key_prefix)
    assert await row_counts(app.state.services.pool) == rows_before
    assert without_limiters(keys_after) == without_limiters(keys_before)
    limiters_after = {k: v for k, v in keys_after.items() if k.endswith(":rate")}
    assert all(keys_before.get(k) == v for k, v in limiters_after.items())


async def test_bad_creations_change_nothing(app, client, world, redis, migrated, baseline):
    _, before = baseline
    for name, raw, headers, status, code in CREATE_CASES:
        r = await client.post("/v1/reservations", content=raw,
                              headers={**world.auth("p1"), **headers})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (name, r.text)
        err = r.json()["error"]
        assert err["retryable"] is False and err["retryAfter"] is None, name
    await assert_unchanged(app, redis, migrated, before)


async def test_streamed_oversized_body_is_refused(app, client, world, redis, migrated,
                                                  baseline):
    _, before = baseline

    async def chunks():
        for _ in range(40):
            yield b" " * 1024  # no Content-Length: counted as it arrives

    r = await client.post("/v1/reservations", content=chunks(),
                          headers={**world.auth("p1"), **JSON})
    assert r.status_code == 413 and r.json()["error"]["code"] == "BODY_TOO_LARGE"
    await assert_unchanged(app, redis, migrated, before)


async def test_bad_actions_change_nothing(app, client, world, redis, migrated, baseline):
    rid, before = baseline
    auth = world.auth("p1")
    cases = [
        (f"/v1/reservations/{rid}/cancel", b'{"why": 1}', {}, 400, "UNKNOWN_FIELD"),
        (f"/v1/reservations/{rid}/cancel", b'{"reason": 5}', {}, 400, "INVALID_FIELD_TYPE"),
        (f"/v1/reservations/{rid}/cancel", b"{", {}, 400, "MALFORMED_JSON"),
        (f"/v1/reservations/{rid}/cancel", b"{}", {"If-Match": "v3"}, 400, "INVALID_IF_MATCH"),
        (f"/v1/reservations/{rid}/extend", b'{"ttlMs": "60000"}', {}, 400,
         "INVALID_FIELD_TYPE"),
        (f"/v1/reservations/{rid}/extend", b'{"ttlMs": 5}', {}, 400, "INVALID_FIELD"),
        (f"/v1/reservations/{rid}/requester-authorization", b'{"outcome": "perhaps"}', {},
         400, "INVALID_OUTCOME"),
    ]
    for path, raw, headers, status, code in cases:
        r = await client.post(path, content=raw, headers={**auth, **JSON, **headers})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, r.text)
    await assert_unchanged(app, redis, migrated, before)
    # Well-formed requests the reservation's state refuses: they count against the rate
    # limits (the limiter keys move), and change nothing else.
    refused = [
        (f"/v1/reservations/{rid}/cancel", {"If-Match": "99"}, 412, "VERSION_MISMATCH"),
        (f"/v1/reservations/{rid}/commit", {}, 409, "INVALID_TRANSITION"),
        ("/v1/reservations/rsv_1_nonsense/cancel", {}, 404, "NOT_FOUND"),
        ("/v1/reservations/rsv_999_01ARZ3NDEKTSV4RRFFQ69G5FAV/cancel", {}, 404, "NOT_FOUND"),
    ]
    for path, headers, status, code in refused:
        r = await client.post(path, content=b"{}", headers={**auth, **JSON, **headers})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, r.text)
    after = await snapshot(redis, migrated.key_prefix)
    assert without_limiters(after) == without_limiters(before[0])
    assert await row_counts(app.state.services.pool) == before[1]


def without_limiters(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(":rate")}


async def test_bad_queries_change_nothing(app, client, world, redis, migrated, baseline):
    _, before = baseline
    auth = world.auth("p1")
    ok = {"startTime": at(0), "endTime": at(60)}
    cases = [
        ({"startTime": at(0)}, 400, "MISSING_PARAMETER"),
        ({**ok, "color": "red"}, 400, "UNKNOWN_PARAMETER"),
        ({**ok, "startTime": "2030-01-01T09:00:00"}, 400, "INVALID_TIMESTAMP"),
        ({**ok, "endTime": at(-60)}, 400, "INVALID_TIME_RANGE"),
        ({**ok, "endTime": "2031-06-01T00:00:00Z"}, 400, "RANGE_TOO_LARGE"),
        ({**ok, "slotDuration": "20"}, 400, "SLOT_DURATION_NOT_ALIGNED"),
        ({**ok, "slotDuration": "-5"}, 400, "INVALID_PARAMETER"),
        ({**ok, "slotDuration": "1", "endTime": at(60 * 24 * 30)}, 400,
         "SLOT_DURATION_NOT_ALIGNED"),
        ({**ok, "includeConfidence": "maybe"}, 400, "INVALID_PARAMETER"),
        ({**ok, "startTime": at(5), "endTime": at(65)}, 400, "SLOT_NOT_ALIGNED"),
        ({**ok, "resourceId": "v-other"}, 400, "RESOURCE_VENDOR_MISMATCH"),
    ]
    for params, status, code in cases:
        r = await client.get("/v1/vendors/v-confirm/availability", params=params, headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (params, r.text)
    r = await client.get("/v1/vendors/nobody/availability", params=ok, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_VENDOR"
    r = await client.get("/v1/ops/audit", params={"limit": "0"}, headers=world.auth("ops"))
    assert r.status_code == 400
    r = await client.get("/v1/ops/audit", params={"since": "2030-01-01"},
                         headers=world.auth("ops"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_TIMESTAMP"
    for name in ("actor", "resourceId", "reservationId"):  # found by schemathesis: was a 500
        r = await client.get("/v1/ops/audit", params={name: "a\x00b"},
                             headers=world.auth("ops"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_PARAMETER"
    await assert_unchanged(app, redis, migrated, before)


async def test_bad_admin_requests_change_nothing(app, client, world, redis, migrated,
                                                 baseline):
    _, before = baseline
    auth = world.auth("admin")
    cases = [
        ("/v1/admin/vendors", {"vendorId": "x", "unitMinutes": 7}, 400),
        ("/v1/admin/vendors", {"vendorId": "x", "unitMinutes": 15,
                               "bufferAfterMinutes": 10}, 400),
        ("/v1/admin/vendors", {"vendorId": "x", "timezone": "Mars/Olympus"}, 400),
        ("/v1/admin/vendors", {"vendorId": "bad id!"}, 400),
        ("/v1/admin/vendors", {"vendorId": "v-confirm"}, 409),
        ("/v1/admin/partners", {"partnerId": "p1"}, 409),
        ("/v1/admin/resources", {"resourceId": "r9", "vendorId": "nobody"}, 404),
        ("/v1/admin/keys", {"role": "root"}, 400),
        ("/v1/admin/keys", {"role": "partner"}, 400),
        ("/v1/admin/keys", {"role": "partner", "partnerId": "nobody"}, 404),
        ("/v1/admin/keys", {"role": "ops", "vendorId": "v-confirm"}, 400),
    ]
    for path, data, status in cases:
        r = await client.post(path, json=data, headers=auth)
        assert r.status_code == status, (path, data, r.text)
    await assert_unchanged(app, redis, migrated, before)


async def test_unknown_routes_and_methods_use_the_envelope(client, world):
    r = await client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "ROUTE_NOT_FOUND"
    r = await client.delete("/v1/reservations")
    assert r.status_code == 405 and r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "POST" in r.headers["allow"]
