"""The invariants of issue 11, checked over a whole traffic history and both stores.

:func:`check` first waits (bounded) until the system has settled: every commit stream is
drained and acknowledged, no known reservation is still ``COMMIT_IN_PROGRESS`` in Redis,
and Postgres holds one audit row per transition. Then it checks, and answers every
violation it found (an empty list is a pass):

- **no overlap**: no two bookings of one resource overlap in Postgres; no two holds the
  history proves were live at the same time overlap (a hold is surely live from its 201 to
  the moment its cancel was sent, or for ever once committed); every unit of a live
  reservation is owned by it in Redis, every unit of a booking reads its booked marker,
  and no finished reservation still owns a unit;
- **nothing committed lost**: every 202-accepted commit is ``COMMITTED`` in Redis and in
  Postgres with exactly one booking row (the booking id agrees); every booking belongs to a
  committed reservation; nothing was dead-lettered;
- **audited exactly once**: for every reservation, its audit and history rows are exactly
  the event ids ``<id>:1 .. <id>:<version>`` (version as Redis and Postgres both record it);
- **no reservation failed on availability** (with Redis keeping its data, Lua must have
  refused the second hold before Postgres had to).

It reads Redis without loading scripts (loading them would hide a readiness bug) and
never writes anything.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from engine.keys import KeySpace
from engine.settings import Settings
from slotguard.fault_traffic import Call, accepted_commits

SETTLE_BOUND_S = 120.0
LIVE = {"INTENT_CREATED", "HELD", "AWAITING_VENDOR_CONFIRMATION", "CONFIRMED_BY_VENDOR",
        "AWAITING_VENDOR_AUTH", "VENDOR_AUTHORIZED", "AWAITING_REQUESTER_AUTH",
        "AUTHORIZED_BOTH", "COMMIT_IN_PROGRESS"}
TIMED_OUT = {"EXPIRED", "FAILED_VENDOR_TIMEOUT"}
DEADLINE_MARGIN_MS = 5_000


@dataclass
class InvariantReport:
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    settle_s: float | None = None  # seconds until settled; None if the bound passed

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self, examples: int = 3) -> list[str]:
        """The violations grouped by kind (the text before the first ':' after the id),
        with a count and a few examples each."""
        groups: dict[str, list[str]] = {}
        for v in self.violations:
            groups.setdefault(_kind(v), []).append(v)
        return [f"{len(found)} x {kind}; e.g. " + " | ".join(found[:examples])
                for kind, found in groups.items()]


def _kind(violation: str) -> str:
    """``rsv_3_XYZ: commit accepted (202) but Redis says 'X'`` -> ``commit accepted (202)
    but Redis says``: ids and quoted values out, so alike violations group together."""
    import re

    text = re.sub(r"\b(rsv|hld|bkg)_\w+", "<id>", violation)
    text = re.sub(r"'[^']*'|\[[^\]]*\]|\{sg:[^}]*\}\S*|\b\d+(\.\d+)?\b", "_", text)
    return text


@dataclass
class Stores:
    redis: dict[str, dict[str, str]]  # reservation id -> its Redis record (empty: gone)
    postgres: dict[str, dict]  # reservation id -> its reservations row
    bookings: list[dict]
    audit: dict[str, list[str]]  # reservation id -> event ids of its audit rows
    history: dict[str, list[str]]  # reservation id -> event ids of its history rows
    unit_ms: dict[str, int]  # resource id -> unit length
    dead_letters: int
    stream_backlog: int  # entries still in the commit streams (pending or not)
    shard_keys: dict[str, str] | None = None  # resource id -> shard key (migration 0011)


async def check(calls: list[Call], settings: Settings, *,
                settle_bound_s: float = SETTLE_BOUND_S) -> InvariantReport:
    """Wait until settled (bounded), then check; the report lists every violation."""
    keys = KeySpace(settings.key_prefix, settings.shards)
    report = InvariantReport()
    from engine.connection import open_redis

    redis = open_redis(settings, socket_timeout=5, socket_connect_timeout=5,
                       health_check_interval=0)
    try:
        quiet_s = 2 * settings.reconcile_interval_s + 10
        stores, report.settle_s = await _settle(calls, settings, keys, redis, settle_bound_s,
                                                quiet_s)
        if report.settle_s is None:
            report.violations.append(
                f"not settled ({settle_bound_s:.0f}s bound, or {quiet_s}s without any change"
                f" and empty streams): {stores.stream_backlog} entries "
                f"in the commit streams, "
                f"{sum(1 for r in stores.redis.values() if r.get('st') == 'COMMIT_IN_PROGRESS')}"
                " reservations COMMIT_IN_PROGRESS")
        report.violations += _check_commits(calls, stores)
        report.violations += _check_audit(stores)
        report.violations += _check_overlaps(calls, stores, settings)
        report.violations += await _check_units(stores, keys, redis)
        if stores.dead_letters:
            report.violations.append(f"{stores.dead_letters} entries dead-lettered")
        report.counts = {
            "creates": sum(1 for c in calls if c.action == "create"),
            "created": sum(1 for c in calls if c.action == "create" and c.status == 201),
            "conflicts": sum(1 for c in calls if c.action == "create" and c.status == 409),
            "no_answer_or_5xx": sum(1 for c in calls if not c.definite),
            "commits_accepted": len(accepted_commits(calls)),
            "cancelled": sum(1 for c in calls if c.action == "cancel" and c.status == 200),
            "bookings": len(stores.bookings),
            "audit_rows": sum(len(v) for v in stores.audit.values()),
            "reservations": len(stores.postgres),
        }
    finally:
        await redis.aclose()
    return report


# ---- reading and settling -------------------------------------------------------------
async def _settle(calls, settings, keys, redis, bound_s, quiet_s
                  ) -> tuple[Stores, float | None]:
    """Read until settled; give up at ``bound_s``, or once the streams have been empty and
    nothing changed for ``quiet_s`` (then only reconciliation could still move anything,
    and it runs every ``reconcile_interval_s``)."""
    started = time.monotonic()
    deadline = started + bound_s
    stores, last_change, fingerprint = None, started, None
    while True:
        try:
            stores, fresh = await _read(calls, settings, keys, redis), True
        except (OSError, asyncpg.PostgresError, aioredis.RedisError, asyncio.TimeoutError):
            fresh = False  # a server is still coming back: read again
        now = time.monotonic()
        if fresh:
            seen = _fingerprint(stores)
            if _settled(stores) and seen == fingerprint:  # settled, twice in a row
                return stores, now - started
            if seen != fingerprint or stores.stream_backlog:
                fingerprint, last_change = seen, now
            elif now - last_change > quiet_s:
                return stores, None
        if now > deadline:
            if stores is None:
                stores = await _read(calls, settings, keys, redis)
            return stores, None
        await asyncio.sleep(0.2)


def _fingerprint(stores: Stores) -> tuple:
    return (tuple(sorted((rid, r.get("st"), r.get("v")) for rid, r in stores.redis.items())),
            sum(len(v) for v in stores.audit.values()), len(stores.bookings),
            stores.dead_letters)


def _settled(stores: Stores) -> bool:
    if stores.stream_backlog:
        return False
    if any(r.get("st") == "COMMIT_IN_PROGRESS" for r in stores.redis.values()):
        return False
    versions = sum(int(r["v"]) for r in stores.redis.values() if r.get("v"))
    return sum(len(v) for v in stores.audit.values()) >= versions


async def _read(calls, settings: Settings, keys: KeySpace, redis) -> Stores:
    from jobs.commit_queue import GROUP

    conn = await asyncpg.connect(settings.database_url, timeout=5,
                                 server_settings={"search_path": settings.db_schema})
    try:
        # One snapshot of every table: a worker committing between two reads would
        # otherwise show a reservation row older than its audit rows.
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        pg_rows = {r["id"]: dict(r) for r in await conn.fetch(
            "SELECT id, state, version, booking_id FROM reservations")}
        bookings = [dict(r) for r in await conn.fetch(
            """SELECT id, reservation_id, resource_id, resource_key,
                      (extract(epoch FROM block_start) * 1000)::bigint AS block_start,
                      (extract(epoch FROM block_end) * 1000)::bigint AS block_end
               FROM bookings WHERE cancelled_at IS NULL""")]
        audit: dict[str, list[str]] = {}
        for r in await conn.fetch("SELECT reservation_id, event_id FROM audit_log"):
            audit.setdefault(r["reservation_id"], []).append(r["event_id"])
        history: dict[str, list[str]] = {}
        for r in await conn.fetch("SELECT reservation_id, event_id FROM reservation_history"):
            history.setdefault(r["reservation_id"], []).append(r["event_id"])
        rows = await conn.fetch("SELECT id, unit_minutes, shard_key FROM resources")
        unit_ms = {r["id"]: r["unit_minutes"] * 60_000 for r in rows}
        shard_keys = {r["id"]: r["shard_key"] for r in rows}
        dead_pg = await conn.fetchval("SELECT count(*) FROM dead_letters")
        await conn.execute("COMMIT")
    finally:
        await conn.close()
    rids = {c.rid for c in calls if c.rid} | set(pg_rows)
    pipe = redis.pipeline(transaction=False)
    ordered = sorted(rids)
    for rid in ordered:
        pipe.hgetall(keys.reservation(rid))
    records = dict(zip(ordered, await pipe.execute()))
    backlog = dead_redis = 0
    for shard in range(keys.shards):
        backlog += await redis.xlen(keys.events(shard))
        dead_redis += await redis.xlen(keys.dead_letters(shard))
        try:
            backlog += (await redis.xpending(keys.events(shard), GROUP))["pending"]
        except aioredis.ResponseError:  # no group yet (no worker started on this Redis)
            pass
    return Stores(records, pg_rows, bookings, audit, history, unit_ms,
                  dead_letters=max(dead_pg, dead_redis), stream_backlog=backlog,
                  shard_keys=shard_keys)


# ---- the checks -----------------------------------------------------------------------
def _check_commits(calls: list[Call], s: Stores) -> list[str]:
    out = []
    booked: dict[str, list[dict]] = {}
    for b in s.bookings:
        booked.setdefault(b["reservation_id"], []).append(b)
    for rid in sorted(accepted_commits(calls)):
        red, pg = s.redis.get(rid, {}), s.postgres.get(rid)
        rows = booked.get(rid, [])
        if red.get("st") != "COMMITTED":
            out.append(f"{rid}: commit accepted (202) but Redis says {red.get('st')!r}")
        if pg is None or pg["state"] != "COMMITTED":
            out.append(f"{rid}: commit accepted (202) but Postgres says "
                       f"{pg and pg['state']!r}")
        if len(rows) != 1:
            out.append(f"{rid}: commit accepted (202) with {len(rows)} booking rows")
        elif red.get("bk") and red["bk"] != rows[0]["id"]:
            out.append(f"{rid}: Redis names booking {red['bk']}, Postgres has {rows[0]['id']}")
    for rid, rows in booked.items():
        state = (s.postgres.get(rid) or {}).get("state")
        if state != "COMMITTED":
            out.append(f"{rid}: booking row(s) {[r['id'] for r in rows]} but state {state!r}")
    for rid, red in s.redis.items():
        if red.get("st") == "FAILED_AVAILABILITY_CHANGED":
            out.append(f"{rid}: FAILED_AVAILABILITY_CHANGED (Redis let two holds overlap)")
    return out


def _check_audit(s: Stores) -> list[str]:
    out = []
    for rid in sorted(set(s.redis) | set(s.postgres)):
        red, pg = s.redis.get(rid) or {}, s.postgres.get(rid)
        version = int(red["v"]) if red.get("v") else (pg["version"] if pg else 0)
        if not version:
            continue  # never existed (a create that did not land)
        if pg is not None and red.get("v") and pg["version"] != int(red["v"]):
            out.append(f"{rid}: version {red['v']} in Redis, {pg['version']} in Postgres")
        expected = sorted(f"{rid}:{v}" for v in range(1, version + 1))
        for table, rows in (("audit", s.audit), ("history", s.history)):
            got = sorted(rows.get(rid, []))
            if got != expected:
                missing = sorted(set(expected) - set(got))
                extra = len(got) - len(set(got))
                out.append(f"{rid}: {table} rows {len(got)} for version {version} "
                           f"(missing {missing[:5]}, duplicates {extra})")
    return out


def _check_overlaps(calls: list[Call], s: Stores, settings: Settings) -> list[str]:
    out = []
    by_resource: dict[str, list[dict]] = {}
    for b in s.bookings:
        by_resource.setdefault(b["resource_id"], []).append(b)
    for resource, rows in by_resource.items():
        rows.sort(key=lambda b: b["block_start"])
        for a, b in zip(rows, rows[1:]):
            if b["block_start"] < a["block_end"]:
                out.append(f"bookings {a['id']} and {b['id']} overlap on {resource}")
    # Holds the history proves were live at once must not overlap.
    min_ttl_s = min(settings.hold_ttl_ms, settings.confirmed_ttl_ms,
                    settings.authorized_ttl_ms) / 1000
    created = {c.rid: c for c in calls if c.action == "create" and c.status == 201}
    released: dict[str, float] = {}
    for c in calls:
        if c.action == "cancel":
            released[c.rid] = min(released.get(c.rid, c.t0), c.t0)
    spans = []
    for rid, c in created.items():
        state = (s.redis.get(rid) or {}).get("st") or (s.postgres.get(rid) or {}).get("state")
        start = c.t1  # surely held once the 201 arrived
        if state == "COMMITTED":
            end = float("inf")
        elif state in LIVE or state in TIMED_OUT:
            # Surely held until released, and never past the shortest stage TTL (after
            # that its units may have expired while the reaper had not moved it yet).
            end = min(released.get(rid, float("inf")), c.t0 + min_ttl_s)
        elif state == "CANCELLED":
            end = released.get(rid, start)  # cancelled by someone else: no sure span
        else:
            end = start
        if end > start:
            spans.append((c.slot[0], c.slot[1], start, end, rid))
    spans.sort()
    for i, (s0, e0, t0, t1, rid0) in enumerate(spans):
        for s1, e1, u0, u1, rid1 in spans[i + 1:]:
            if s1 >= e0:
                break
            if u0 < t1 and t0 < u1:
                out.append(f"holds {rid0} and {rid1} overlap in slot and were both live")
    return out


async def _check_units(s: Stores, keys: KeySpace, redis) -> list[str]:
    """Every unit of a live reservation is its own; every booked unit is marked."""
    expect: dict[str, str | None] = {}  # unit key -> owner it must have (None: not this rid)
    leaks: dict[str, str] = {}  # unit key -> finished reservation that must not own it
    booked = {b["reservation_id"]: b for b in s.bookings}
    seconds, micros = await redis.time()
    soon_ms = seconds * 1000 + micros // 1000 + DEADLINE_MARGIN_MS
    for rid, red in s.redis.items():
        state = red.get("st")
        if not state or not red.get("rs"):
            continue
        if state in LIVE and state != "COMMIT_IN_PROGRESS" and int(red.get("dl") or 0) < soon_ms:
            continue  # its units expire (or expired) by TTL before the reaper moves it
        resource, unit = red["rs"], s.unit_ms.get(red["rs"])
        if unit is None:
            continue
        block = range(int(red["bs"]) // unit, (int(red["be"]) - 1) // unit + 1)
        for index in block:
            key = f"{keys.unit_root(keys.shard_of_id(rid))}{resource}:{index}"
            if state == "COMMITTED":
                expect[key] = f"B|{rid}"
            elif state in LIVE:
                expect[key] = rid
            else:
                leaks[key] = rid
    for rid, b in booked.items():
        unit = s.unit_ms[b["resource_id"]]
        for index in range(b["block_start"] // unit, (b["block_end"] - 1) // unit + 1):
            expect[keys.unit(b["resource_id"], index,
                             (s.shard_keys or {}).get(b["resource_id"]))] = f"B|{rid}"
    out = []
    names = sorted(set(expect) | set(leaks))
    pipe = redis.pipeline(transaction=False)
    for key in names:
        pipe.get(key)
    owners = dict(zip(names, await pipe.execute()))
    for key, owner in expect.items():
        if owners[key] != owner:
            out.append(f"unit {key} should be owned by {owner}, reads {owners[key]!r}")
    for key, rid in leaks.items():
        if key not in expect and owners[key] in (rid, f"B|{rid}"):
            out.append(f"unit {key} still owned by finished reservation {rid}")
    return out
