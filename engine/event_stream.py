"""The live stream (issue 14): ``GET /v1/events/stream`` as Server-Sent Events.

Source: the outbox table ``webhook_events`` in Postgres, the rows the commit queue writes in
the transaction that records each transition (engine/webhook_events.py). Not the Redis
shard streams: the commit queue deletes its entries once they are written (XACK + XDEL),
so they cannot be resumed from, and a transition is only an event once it is recorded.
``position`` (bigserial, made visible in order by the writers' advisory lock) is each
message's ``id:``; ``Last-Event-ID`` (or ``?lastEventId=``) resumes after it. A new stream
without one starts at the newest event (only what happens from now on). The first message
is ``event: stream.opened`` with ``data: {"position": N}`` (no ``id:``): the position the
stream starts after.

Tenancy as for webhooks: a partner sees its reservations' events, a vendor its vendor's,
ops/admin/system every event (the ops-only ``hold.*`` ones too). ``vendorId`` narrows to one
vendor (a vendor key may name only its own: another is 404, as for availability);
``types`` (comma-separated) to some event types.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from engine.errors import ValidationError
from engine.keys import NAME_RE
from engine.permissions import PARTNER, VENDOR, Principal, require, require_vendor_scope
from engine.webhook_events import EVENT_TYPES

MAX_BATCH = 500
MAX_POSITION = 2**63 - 1


@dataclass(frozen=True, slots=True)
class StreamQuery:
    partner_id: str | None
    vendor_id: str | None
    types: list[str] | None
    after: int | None  # resume after this position; None: from now on


def _bad(message: str, field: str, code: str = "INVALID_FIELD") -> ValidationError:
    return ValidationError(message, code=code, details={"field": field})


def stream_query(principal: Principal, params: dict[str, str],
                 last_event_id: str | None) -> StreamQuery:
    """Who may stream (403) and which events, validated before anything is read."""
    require(principal, "events.stream")
    unknown = set(params) - {"vendorId", "types", "lastEventId"}
    if unknown:
        name = sorted(unknown)[0][:100]
        raise _bad(f"unknown query parameter {name!r}", name, "UNKNOWN_PARAMETER")
    vendor = params.get("vendorId")
    if vendor is not None:
        if not NAME_RE.match(vendor):
            raise _bad("vendorId must be a name of 1..64 letters, digits, '_', '.' or '-'",
                       "vendorId")
        require_vendor_scope(principal, vendor)
    types = None
    if "types" in params:
        types = [t.strip() for t in params["types"].split(",") if t.strip()]
        if not types or any(t not in EVENT_TYPES for t in types):
            raise _bad("types must be comma-separated event types", "types",
                       "UNKNOWN_EVENT_TYPE")
    # Both forms are checked when both are given; the header wins.
    after = None
    for raw, field in ((params.get("lastEventId"), "lastEventId"),
                       (last_event_id, "Last-Event-ID")):
        if raw is None:
            continue
        try:
            after = int(raw.strip())
        except ValueError:
            after = -1
        if not 0 <= after <= MAX_POSITION:
            raise _bad(f"{field} must be an id this stream sent", field)
    partner_id = principal.partner_id if principal.role == PARTNER else None
    if principal.role == VENDOR:
        vendor = principal.vendor_id
    return StreamQuery(partner_id, vendor, types, after)


_READ = """
SELECT position, type, payload::text FROM webhook_events
WHERE position > $1 AND audience <> 'endpoint'
  AND ($2::text IS NULL OR (partner_id = $2 AND audience = 'tenants'))
  AND ($3::text IS NULL OR (vendor_id = $3 AND audience = 'tenants'))
  AND ($4::text[] IS NULL OR type = ANY($4))
ORDER BY position LIMIT $5
"""


async def start_position(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT coalesce(max(position), 0) FROM webhook_events")


async def read_after(pool: asyncpg.Pool, query: StreamQuery, after: int
                     ) -> list[tuple[int, str, str]]:
    """The next events after ``after`` for this query: (position, type, payload JSON)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_READ, after, query.partner_id, query.vendor_id, query.types,
                                MAX_BATCH)
    return [(r[0], r[1], r[2]) for r in rows]


def sse_message(position: int, kind: str, data: str) -> bytes:
    return f"id: {position}\nevent: {kind}\ndata: {data}\n\n".encode()


HEARTBEAT = b": heartbeat\n\n"


async def messages(pool: asyncpg.Pool, query: StreamQuery, *, poll_s: float,
                   heartbeat_s: float, clock, sleep) -> AsyncIterator[bytes]:
    """The stream's bytes: events as they come, a heartbeat comment when nothing was sent
    for ``heartbeat_s``. Endless; the caller stops iterating when the client goes."""
    after = query.after if query.after is not None else await start_position(pool)
    # The first message says the stream is open and where it starts (no id: it moves no
    # Last-Event-ID).
    yield f"retry: 2000\nevent: stream.opened\ndata: {{\"position\": {after}}}\n\n".encode()
    last_sent = clock()
    while True:
        rows = await read_after(pool, query, after)
        for position, kind, data in rows:
            yield sse_message(position, kind, data)
            after = position
        if rows:
            last_sent = clock()
            if len(rows) == MAX_BATCH:
                continue
        elif clock() - last_sent >= heartbeat_s:
            yield HEARTBEAT
            last_sent = clock()
        await sleep(poll_s)
