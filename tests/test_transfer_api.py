"""Hold transfer (issue 16) over HTTP against real Redis and Postgres: the offer's one-time
token, the atomic hand-over (version + 1, both partners in one event, caps moved), every
refusal typed and changing nothing, and two partners racing one token."""

from __future__ import annotations

import asyncio

import orjson

from engine import directory
from jobs.commit_queue import CommitQueue
from tests.conftest import snapshot
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    client,
    create_body,
    migrated,
    world,
)


async def state_of(redis, prefix: str) -> dict:
    """Every key (value, expiring or not), the rate limiters left out (a refused request
    is still counted by them, and changes nothing else)."""
    return {k: v for k, v in (await snapshot(redis, prefix)).items()
            if not k.endswith(":rate")}


async def hold(client, world, who="p1", start=0, vendor="v-confirm") -> str:
    r = await client.post("/v1/reservations", json=create_body(vendor=vendor, start=start),
                          headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()["reservationId"]


async def offer(client, world, rid, who="p1", **body) -> dict:
    r = await client.post(f"/v1/reservations/{rid}/transfer-offers", json=body,
                          headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()


async def add_partner(app, world, partner: str) -> None:
    from api.auth import issue_key

    async with app.state.services.pool.acquire() as conn:
        await directory.create_partner(conn, partner, partner.upper())
        issued, _ = await issue_key(conn, "partner", partner_id=partner)
    world.keys[partner] = issued.key


async def test_transfer_hands_the_hold_over_atomically(app, client, world, redis):
    svc = app.state.services
    keys, limits = svc.keyspace, svc.reservations.limits
    rid = await hold(client, world)
    before = (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))).json()
    made = await offer(client, world, rid, toPartnerId="p2")
    token = made["acceptanceToken"]
    assert token.startswith("xfr_") and made["toPartnerId"] == "p2"
    assert made["version"] == before["version"] and made["state"] == before["state"]
    # Stored hashed only, under the reservation's hash tag, expiring with the offer.
    stored = await redis.hgetall(keys.transfer_offer(rid))
    assert token not in str(stored) and len(stored["d"]) == 64
    assert await redis.execute_command("PEXPIRETIME", keys.transfer_offer(rid)) == \
        int(stored["x"])

    r = await client.post(f"/v1/reservations/{rid}/transfer",
                          json={"acceptanceToken": token}, headers=world.auth("p2"))
    assert r.status_code == 200, r.text
    moved = r.json()
    assert moved["version"] == before["version"] + 1
    assert moved["state"] == before["state"] and moved["expiresAt"] == before["expiresAt"]
    last = moved["stateHistory"][-1]
    assert last["reason"] == "transferred" and last["triggeredBy"] == "partner"
    assert last["metadata"]["transfer"] == {"fromPartnerId": "p1", "toPartnerId": "p2"}
    assert await redis.hget(keys.reservation(rid), "p") == "p2"
    # The units keep their owner: the reservation.
    shard = keys.shard_of_id(rid)
    _, entry = (await redis.xrange(keys.events(shard)))[-1]
    assert entry["transferredFromPartnerId"] == "p1"
    assert entry["transferredToPartnerId"] == "p2"
    assert entry["fromState"] == entry["toState"] == before["state"]
    # Tenancy follows the hold: p2 sees and acts on it, p1 no longer does.
    assert (await client.get(f"/v1/reservations/{rid}",
                             headers=world.auth("p1"))).status_code == 404
    assert (await client.get(f"/v1/reservations/{rid}",
                             headers=world.auth("p2"))).status_code == 200
    r = await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert r.status_code == 404
    # The caps moved: p1's slot is free, p2 holds one scored by the deadline.
    deadline = int(await redis.hget(keys.reservation(rid), "dl"))

    async def caps_moved() -> bool:
        return (await redis.zscore(keys.partner_holds("p1"), rid) is None
                and await redis.zscore(keys.partner_holds("p2"), rid) == deadline)

    from tests.timing import eventually
    await eventually(caps_moved, what="cap slots moved")
    assert await limits.live_holds("p2") == 1
    # A used token is refused, typed, and changes nothing.
    keep = await state_of(redis, svc.settings.key_prefix)
    r = await client.post(f"/v1/reservations/{rid}/transfer",
                          json={"acceptanceToken": token}, headers=world.auth("p2"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "TRANSFER_TOKEN_USED"
    assert await state_of(redis, svc.settings.key_prefix) == keep


async def drain(svc) -> None:
    queue = CommitQueue(svc.access, svc.keyspace, svc.pool, svc.reservations.engine,
                        svc.settings.replace(drain_block_ms=50), "t")
    await queue.ensure_groups()
    try:
        for _ in range(3):
            for shard in range(svc.keyspace.shards):
                await queue.drain_shard_once(shard)
    finally:
        await queue.close()


async def test_worker_records_the_new_partner(app, client, world, redis):
    svc = app.state.services
    rid = await hold(client, world)
    token = (await offer(client, world, rid))["acceptanceToken"]
    r = await client.post(f"/v1/reservations/{rid}/transfer",
                          json={"acceptanceToken": token}, headers=world.auth("p2"))
    assert r.status_code == 200, r.text
    await drain(svc)
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT partner_id, version FROM reservations WHERE id=$1",
                                  rid)
        audit = await conn.fetchrow(
            "SELECT tenant_id, metadata FROM audit_log WHERE event_id = $1",
            f"{rid}:{row['version']}")
    assert row["partner_id"] == "p2"
    assert audit["tenant_id"] == "p2"
    meta = audit["metadata"]
    meta = meta if isinstance(meta, dict) else orjson.loads(meta)
    assert meta["transfer"] == {"fromPartnerId": "p1", "toPartnerId": "p2"}
    assert meta["reason"] == "transferred"


async def test_refusals_are_typed_and_change_nothing(app, client, world, redis):
    svc = app.state.services
    prefix = svc.settings.key_prefix
    await add_partner(app, world, "p3")
    rid = await hold(client, world)
    addressed = (await offer(client, world, rid, toPartnerId="p2"))["acceptanceToken"]
    cases = [
        # (who, token, status, code)
        ("p3", addressed, 403, "TRANSFER_WRONG_PARTNER"),
        ("p1", addressed, 403, "TRANSFER_WRONG_PARTNER"),
        ("p2", "xfr_" + "A" * 43, 404, "TRANSFER_TOKEN_INVALID"),
        ("p2", "not-a-token", 400, "INVALID_FIELD"),
        ("vendor", addressed, 403, "FORBIDDEN"),
        ("ops", addressed, 403, "FORBIDDEN"),
    ]
    before = await state_of(redis, prefix)
    for who, token, status, code in cases:
        r = await client.post(f"/v1/reservations/{rid}/transfer",
                              json={"acceptanceToken": token}, headers=world.auth(who))
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (who, r.text)
    for bad in ({}, {"acceptanceToken": 5}, {"acceptanceToken": addressed, "x": 1}):
        r = await client.post(f"/v1/reservations/{rid}/transfer", json=bad,
                              headers=world.auth("p2"))
        assert r.status_code == 400, r.text
    # Offers: only the holder, never to itself, to an existing partner, ttl in range.
    offer_cases = [
        ("p2", {}, 404, "NOT_FOUND"),
        ("p1", {"toPartnerId": "p1"}, 409, "TRANSFER_TO_SELF"),
        ("p1", {"toPartnerId": "nobody"}, 404, "UNKNOWN_PARTNER"),
        ("p1", {"ttlMs": 10}, 400, "INVALID_FIELD"),
        ("p1", {"ttlMs": 10**9}, 400, "INVALID_FIELD"),
        ("vendor", {}, 403, "FORBIDDEN"),
    ]
    for who, body, status, code in offer_cases:
        r = await client.post(f"/v1/reservations/{rid}/transfer-offers", json=body,
                              headers=world.auth(who))
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (who, r.text)
    assert await state_of(redis, prefix) == before
    # A stale If-Match is refused too, before anything changes.
    r = await client.post(f"/v1/reservations/{rid}/transfer",
                          json={"acceptanceToken": addressed},
                          headers={**world.auth("p2"), "If-Match": '"7"'})
    assert r.status_code == 412, r.text
    assert await state_of(redis, prefix) == before


async def test_terminal_or_superseded_holds_refuse_the_token(app, client, world, redis):
    svc = app.state.services
    prefix = svc.settings.key_prefix
    rid = await hold(client, world)
    token = (await offer(client, world, rid))["acceptanceToken"]
    # A new offer replaces the first: its token no longer works.
    second = (await offer(client, world, rid))["acceptanceToken"]
    r = await client.post(f"/v1/reservations/{rid}/transfer",
                          json={"acceptanceToken": token}, headers=world.auth("p2"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "TRANSFER_TOKEN_INVALID"
    r = await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert r.status_code == 200
    before = await state_of(redis, prefix)
    r = await client.post(f"/v1/reservations/{rid}/transfer",
                          json={"acceptanceToken": second}, headers=world.auth("p2"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "RESERVATION_TERMINAL"
    assert await state_of(redis, prefix) == before
    r = await client.post(f"/v1/reservations/{rid}/transfer-offers", json={},
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "RESERVATION_TERMINAL"
    assert await state_of(redis, prefix) == before


async def test_a_full_cap_refuses_the_transfer_and_changes_nothing(app, client, world, redis):
    svc = app.state.services
    prefix = svc.settings.key_prefix
    tuned = svc.settings.replace(partner_max_live_holds=1)
    svc.reservations.limits.settings = tuned
    svc.transfers.engine.limits.settings = tuned
    mine = await hold(client, world, who="p1")
    await hold(client, world, who="p2", start=120)  # p2 is at its cap
    token = (await offer(client, world, mine))["acceptanceToken"]
    before = await state_of(redis, prefix)
    r = await client.post(f"/v1/reservations/{mine}/transfer",
                          json={"acceptanceToken": token}, headers=world.auth("p2"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "HOLD_CAP_EXCEEDED"
    assert await state_of(redis, prefix) == before


async def test_two_partners_racing_one_token_exactly_one_wins(app, client, world, redis):
    """An open offer (any partner): many acceptances of several partners at once, over many
    rounds; each round exactly one wins, the others are TRANSFER_TOKEN_USED, and the record,
    the history and the caps agree with the winner."""
    svc = app.state.services
    keys = svc.keyspace
    for p in ("p3", "p4"):
        await add_partner(app, world, p)
    takers = ["p2", "p3", "p4"]
    for round_ in range(8):
        rid = await hold(client, world, start=60 * round_)
        token = (await offer(client, world, rid))["acceptanceToken"]
        results = await asyncio.gather(*(
            client.post(f"/v1/reservations/{rid}/transfer", json={"acceptanceToken": token},
                        headers=world.auth(who))
            for who in takers for _ in range(4)))
        wins = [(takers[i // 4], r) for i, r in enumerate(results) if r.status_code == 200]
        assert len(wins) == 1, [r.status_code for r in results]
        losers = [r for r in results if r.status_code != 200]
        assert {(r.status_code, r.json()["error"]["code"]) for r in losers} == \
            {(409, "TRANSFER_TOKEN_USED")}
        winner = wins[0][0]
        assert await redis.hget(keys.reservation(rid), "p") == winner
        history = [h for h in wins[0][1].json()["stateHistory"] if h["reason"] == "transferred"]
        assert len(history) == 1
        shard = keys.shard_of_id(rid)
        transfers = [e for _, e in await redis.xrange(keys.events(shard))
                     if e.get("reservationId") == rid and e.get("reason") == "transferred"]
        assert len(transfers) == 1 and transfers[0]["transferredToPartnerId"] == winner

        async def caps_agree() -> bool:
            holders = [p for p in ["p1", *takers]
                       if await redis.zscore(keys.partner_holds(p), rid) is not None]
            return holders == [winner]

        from tests.timing import eventually
        await eventually(caps_agree, what="only the winner's cap holds the reservation")
