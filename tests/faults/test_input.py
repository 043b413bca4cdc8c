"""Hostile input (issue 11, items 1, 6, 8, 13): what Postgres cannot store or a serializer on
the path cannot carry is refused at the API with the error envelope, and changes nothing in
Redis or Postgres (snapshot before and after, as tests/test_api_validation.py does).
Each case failed on the code before the fix (accepted, stored, truncated or a 500)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg
import orjson
import pytest

from api.auth import issue_key
from tests.conftest import DATABASE_URL, snapshot
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
from tests.test_api_validation import assert_unchanged, without_limiters

JSON = {"Content-Type": "application/json"}


def nested(depth: int) -> dict:
    """A JSON object nesting ``depth`` levels (the object itself is level 1)."""
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def nested_text(depth: int) -> bytes:
    """:func:`nested` as JSON text (orjson refuses to write 255 levels or more)."""
    return b'{"n":' * (depth - 1) + b'{"leaf":1}' + b"}" * (depth - 1)


def with_metadata(body: dict, metadata_text: bytes) -> bytes:
    return orjson.dumps({**body, "metadata": "@@"}).replace(b'"@@"', metadata_text)


@pytest.fixture
async def live(app, client, world, redis, migrated):
    """A live reservation to act on, then the state every refused request must leave."""
    r = await client.post("/v1/reservations", json=create_body(start=600),
                          headers=world.auth("p1"))
    assert r.status_code == 201, r.text
    rid = r.json()["reservationId"]
    before = (await snapshot(redis, migrated.key_prefix),
              await row_counts(app.state.services.pool))
    return rid, before


async def _refused(client, path: str, raw: bytes, auth: dict, status: int, code: str) -> None:
    r = await client.post(path, content=raw, headers={**auth, **JSON})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, raw[:80], r.text)
    assert set(r.json()["error"]) == {"code", "message", "details", "retryable", "retryAfter"}


async def test_nul_anywhere_in_a_body_is_refused(app, client, world, redis, migrated, live):
    rid, before = live
    auth = world.auth("p1")
    create_cases = [
        {"metadata": {"n": "a\u0000b"}},
        {"metadata": {"a\u0000b": "n"}},
        {"metadata": {"deep": [{"x": ["ok", "\u0000"]}]}},
    ]
    for extra in create_cases:
        await _refused(client, "/v1/reservations",
                       orjson.dumps(create_body(start=0, **extra)), auth, 400,
                       "INVALID_CHARACTER")
    for action in ("cancel", "extend"):
        await _refused(client, f"/v1/reservations/{rid}/{action}",
                       orjson.dumps({"metadata": {"note": "x\u0000"}}), auth, 400,
                       "INVALID_CHARACTER")
    await _refused(client, "/v1/admin/partners",
                   orjson.dumps({"partnerId": "p9", "name": "nul\u0000name"}),
                   world.auth("admin"), 400, "INVALID_CHARACTER")
    await assert_unchanged(app, redis, migrated, before)


async def test_nesting_deeper_than_the_limit_is_refused_everywhere(app, client, world, redis,
                                                                   migrated, live):
    rid, before = live
    auth = world.auth("p1")
    # 33 levels used to be stored; 251-254 stored and then broke GET; 255+ was a 500.
    for depth in (33, 252, 300):
        await _refused(client, "/v1/reservations",
                       with_metadata(create_body(start=0), nested_text(depth)), auth, 400,
                       "NESTING_TOO_DEEP")
        for action in ("cancel", "extend", "vendor-confirmation"):
            who = world.auth("vendor") if action == "vendor-confirmation" else auth
            await _refused(client, f"/v1/reservations/{rid}/{action}",
                           with_metadata({}, nested_text(depth)), who, 400,
                           "NESTING_TOO_DEEP")
    await assert_unchanged(app, redis, migrated, before)
    # At the limit (the body is level 1, metadata level 2): stored and read back intact.
    r = await client.post("/v1/reservations",
                          json=create_body(start=120, metadata=nested(31)), headers=auth)
    assert r.status_code == 201, r.text
    got = await client.get(f"/v1/reservations/{r.json()['reservationId']}", headers=auth)
    assert got.status_code == 200
    assert got.json()["metadata"]["n"] == nested(31)["n"]


async def test_integers_beyond_64_bits_are_refused(app, client, world, redis, migrated, live):
    rid, before = live
    auth = world.auth("p1")
    for number in (2**64, 2**63, -(2**63) - 1, 10**30, 1e300, -1e19):
        raw = create_body(start=0)
        text = json.dumps({**raw, "metadata": {"n": number}}).encode()
        await _refused(client, "/v1/reservations", text, auth, 400, "NUMBER_OUT_OF_RANGE")
        await _refused(client, f"/v1/reservations/{rid}/cancel",
                       json.dumps({"metadata": {"n": [number]}}).encode(), auth, 400,
                       "NUMBER_OUT_OF_RANGE")
    await assert_unchanged(app, redis, migrated, before)
    # The bounds themselves and floats within them survive a round trip unchanged.
    body = {**create_body(start=120),
            "metadata": {"lo": -(2**63), "hi": 2**63 - 1, "f": 1.5e18}}
    r = await client.post("/v1/reservations", content=json.dumps(body).encode(),
                          headers={**auth, **JSON})
    assert r.status_code == 201, r.text
    got = (await client.get(f"/v1/reservations/{r.json()['reservationId']}",
                            headers=auth)).json()
    assert (got["metadata"]["lo"], got["metadata"]["hi"], got["metadata"]["f"]) == \
        (-(2**63), 2**63 - 1, 1.5e18)


def _metadata_of_size(size: int) -> dict:
    metadata = {"pad": ""}
    metadata["pad"] = "x" * (size - len(orjson.dumps(metadata)))
    assert len(orjson.dumps(metadata)) == size
    return metadata


async def test_the_metadata_limit_is_the_clients_4096_bytes(app, client, world, redis, migrated,
                                                            live):
    _, before = live
    auth = world.auth("p1")
    await _refused(client, "/v1/reservations",
                   orjson.dumps(create_body(start=0, metadata=_metadata_of_size(4097))), auth,
                   400, "METADATA_TOO_LARGE")
    await assert_unchanged(app, redis, migrated, before)
    exact = _metadata_of_size(4096)
    r = await client.post("/v1/reservations", json=create_body(start=0, metadata=exact),
                          headers=auth)
    assert r.status_code == 201, r.text  # the server's requestId is not the client's bytes
    got = (await client.get(f"/v1/reservations/{r.json()['reservationId']}",
                            headers=auth)).json()
    assert got["metadata"]["pad"] == exact["pad"] and "requestId" in got["metadata"]


async def test_extend_stores_its_metadata(app, client, world, live):
    rid, _ = live
    r = await client.post(f"/v1/reservations/{rid}/extend",
                          json={"metadata": {"why": "customer on the phone"}, "ttlMs": 60_000},
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    extension = r.json()["stateHistory"][-1]
    assert extension["reason"] == "extended"
    assert extension["metadata"]["why"] == "customer on the phone"
    got = (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))).json()
    assert got["stateHistory"][-1]["metadata"]["why"] == "customer on the phone"


async def test_invisible_requester_ids_are_refused(app, client, world, redis, migrated, live):
    _, before = live
    for invisible in ("\u200b", "\u200b\u200d\u2060", "\u3164", "\u2800\u2800",
                      "\u00a0\u3000", "\u0301"):
        await _refused(client, "/v1/reservations",
                       orjson.dumps(create_body(start=0, requesterId=invisible)),
                       world.auth("p1"), 400, "INVALID_FIELD")
    await assert_unchanged(app, redis, migrated, before)
    r = await client.post("/v1/reservations",
                          json=create_body(start=0, requesterId="\u200bréa\u200d"),
                          headers=world.auth("p1"))
    assert r.status_code == 201, r.text


async def test_off_grid_precision_and_impossible_offsets_are_refused(app, client, world, redis,
                                                                     migrated, live):
    _, before = live
    auth = world.auth("p1")
    cases = [
        {"slotStartTime": "2030-01-01T09:00:00.0004Z"},  # was truncated onto the grid
        {"slotStartTime": "2030-01-01T09:00:00.000001Z"},
        {"slotStartTime": "2030-01-02T08:59:00+23:59", "slotEndTime": at(30)},
        {"slotStartTime": "2030-01-01T23:15:00+14:15", "slotEndTime": at(30)},
        {"slotEndTime": "2030-01-01T18:30:00-15:00"},
    ]
    for changes in cases:
        await _refused(client, "/v1/reservations",
                       orjson.dumps({**create_body(start=0), **changes}), auth, 400,
                       "INVALID_TIMESTAMP")
    await assert_unchanged(app, redis, migrated, before)
    # The widest real offsets and whole milliseconds are fine.
    ok = {**create_body(start=0), "slotStartTime": "2030-01-01T23:00:00.000+14:00",
          "slotEndTime": "2029-12-31T21:30:00-12:00"}
    r = await client.post("/v1/reservations", json=ok, headers=auth)
    assert r.status_code == 201, r.text


async def test_reserved_partner_ids_are_refused_by_the_admin_api(app, client, world, redis,
                                                                 migrated):
    before = (await snapshot(redis, migrated.key_prefix),
              await row_counts(app.state.services.pool))
    for reserved in ("system", "ops", "admin", "vendor", "partner", "internal", "System"):
        await _refused(client, "/v1/admin/partners",
                       orjson.dumps({"partnerId": reserved}), world.auth("admin"), 400,
                       "RESERVED_PARTNER_ID")
    await assert_unchanged(app, redis, migrated, before)


def test_reserved_partner_ids_are_refused_by_the_cli(settings):
    env = {**os.environ, "DATABASE_URL": DATABASE_URL,
           "SLOTGUARD_KEY_PREFIX": settings.key_prefix,
           "SLOTGUARD_DB_SCHEMA": settings.db_schema, "SLOTGUARD_SHARDS": str(settings.shards)}
    cli = [sys.executable, "-m", "slotguard"]
    try:
        subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True, timeout=60)
        done = subprocess.run([*cli, "partners", "create", "--id", "system"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "reserved" in (done.stderr + done.stdout)
        count = subprocess.run(
            ["psql", DATABASE_URL, "-tAc",
             f'SELECT count(*) FROM "{settings.db_schema}".partners'],
            capture_output=True, text=True, check=True).stdout.strip()
        assert count == "0"
    finally:
        subprocess.run(["psql", DATABASE_URL, "-qc",
                        f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'],
                       capture_output=True, check=False)


async def test_a_partner_named_system_is_not_the_system_role(app, client, world, redis,
                                                             migrated):
    """A partner id ``system`` that exists anyway (created before the rule, or by hand) reads,
    cancels, replays and caps nothing of what system keys created."""
    pool = app.state.services.pool
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO partners (id, name, active) VALUES ('system', 'S', true)")
        issued, _ = await issue_key(conn, "partner", partner_id="system")
    impostor = {"Authorization": f"Bearer {issued.key}"}
    system = world.auth("system")
    limits = app.state.services.reservations.limits
    original = limits.settings
    limits.settings = original.replace(partner_max_live_holds=1)
    try:
        body = create_body(start=0, idempotencyKey="shared-key")
        made = await client.post("/v1/reservations", json=body, headers=system)
        assert made.status_code == 201, made.text
        rid = made.json()["reservationId"]
        before = (await snapshot(redis, migrated.key_prefix), await row_counts(pool))
        assert (await client.get(f"/v1/reservations/{rid}", headers=impostor)).status_code \
            == 404
        r = await client.post(f"/v1/reservations/{rid}/cancel", json={}, headers=impostor)
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
        # A 404 of tenancy is answered after the rate limits (probing ids is counted): only
        # the limiters may have moved.
        assert without_limiters(await snapshot(redis, migrated.key_prefix)) == \
            without_limiters(before[0])
        assert await row_counts(pool) == before[1]
        # Same key, same body: not the system's stored answer, and not its cap: the slot is
        # taken (409), where a shared cap of 1 would have answered 429.
        r = await client.post("/v1/reservations", json=body, headers=impostor)
        assert "idempotent-replayed" not in r.headers
        assert r.status_code == 409 and r.json()["error"]["code"] == "SLOT_UNAVAILABLE"
        r = await client.post("/v1/reservations", json=create_body(start=120),
                              headers=impostor)
        assert r.status_code == 201, r.text
        # The system key still sees its own reservation, under a scope no partner can name.
        got = await client.get(f"/v1/reservations/{rid}", headers=system)
        assert got.status_code == 200
        assert await redis.exists(app.state.services.keyspace.idempotency("_system",
                                                                          "shared-key"))
    finally:
        limits.settings = original


async def test_refused_creates_of_every_kind_write_no_idempotency_record(app, client, world,
                                                                         redis, migrated):
    """A 400 never claims the key (validation runs before the first round trip)."""
    before = (await snapshot(redis, migrated.key_prefix),
              await row_counts(app.state.services.pool))
    r = await client.post("/v1/reservations",
                          json=create_body(start=0, metadata={"n": "\u0000"},
                                           idempotencyKey="k-bad"),
                          headers=world.auth("p1"))
    assert r.status_code == 400
    await assert_unchanged(app, redis, migrated, before)
    assert not [k for k in (await snapshot(redis, migrated.key_prefix)) if ":idem:" in k]


async def test_postgres_would_have_refused_what_the_api_refuses(migrated):
    """The premise of the NUL rule, checked against the real server: text with NUL cannot be
    stored, so accepting it would have poisoned the commit queue."""
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        with pytest.raises(asyncpg.exceptions.UntranslatableCharacterError):
            await conn.fetchval("SELECT $1::jsonb", '{"n": "a\\u0000b"}')
    finally:
        await conn.close()
