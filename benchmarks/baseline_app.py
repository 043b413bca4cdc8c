"""The HTTP baselines, served by the same uvicorn setup as the API (uvloop, httptools).

- ``GET /hello``: the HTTP ceiling of one worker (nothing behind the route);
- ``POST /holds`` and ``POST /holds/release``: the minimal Starlette endpoint calling the bare
  place_hold / release_hold script, one EVALSHA per request (no coalescing, no auth, no
  idempotency, no limits). ``POST /v1/reservations`` is held against this one.
- ``POST /pg/bookings`` and ``POST /pg/bookings/release``: the ``pg_endpoint`` baseline, what a
  user would build instead of slotguard: one asyncpg ``INSERT ... ON CONFLICT DO NOTHING``
  into a table whose exclusion constraint forbids overlaps (core GiST only, as
  ``bookings``), in a schema of its own (:func:`pg_endpoint_schema`), through a pool of
  asyncpg's default size per worker.

    uvicorn benchmarks.baseline_app:app_from_env --factory
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
import orjson
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from benchmarks.load import LONG_TTL_MS
from engine.access import RedisAccess
from engine.errors import Outcome
from engine.keys import KeySpace
from engine.settings import Settings


def _json(content, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code,
                    media_type="application/json")


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def place(request: Request) -> Response:
    access: RedisAccess = request.app.state.access
    keys: KeySpace = request.app.state.keys
    body = orjson.loads(await request.body())
    resource, first, last = body["resourceId"], int(body["first"]), int(body["last"])
    hold_id = keys.new_hold_id(resource)
    shard = keys.shard_of(resource)
    reply = await access.call_once(
        "place_hold", [keys.unit_root(shard), keys.hold(hold_id), keys.fence(resource)],
        [hold_id, resource, first, last, LONG_TTL_MS, request.app.state.max_units, "bench"])
    if int(reply[0]) == Outcome.OK:
        return _json({"holdId": hold_id, "expiresAt": int(reply[1]),
                      "fenceToken": int(reply[2])}, 201)
    if int(reply[0]) == Outcome.CONFLICT:
        holder = str(reply[1]).removeprefix("B|")
        return _json({"holder": holder, "unit": int(reply[2])}, 409)
    return _json({"error": str(reply)}, 400)


async def release(request: Request) -> Response:
    access: RedisAccess = request.app.state.access
    keys: KeySpace = request.app.state.keys
    body = orjson.loads(await request.body())
    hold_id = body["holdId"]
    reply = await access.call_once(
        "release_hold", [keys.unit_root(keys.shard_of_id(hold_id)), keys.hold(hold_id)],
        [hold_id, int(body["fenceToken"])])
    return _json({"released": int(reply[0]) == 1}, 200 if int(reply[0]) == 1 else 409)


def pg_endpoint_schema(settings: Settings) -> str:
    """The pg_endpoint baseline's own schema (created and dropped by the bench run)."""
    return f"{settings.db_schema}_pgep"


# A user's bookings table: the buffered block may not overlap another live booking of the
# resource. Without btree_gist the resource is a one-point int8range (as in
# engine/migrations/0003_bookings.sql); columns named as the verifier expects.
PG_ENDPOINT_DDL = """
CREATE SCHEMA IF NOT EXISTS "{schema}";
CREATE TABLE IF NOT EXISTS "{schema}".bookings (
    id text PRIMARY KEY, resource_id text NOT NULL, resource_key bigint NOT NULL,
    block_start timestamptz NOT NULL, block_end timestamptz NOT NULL,
    cancelled_at timestamptz,
    CONSTRAINT bookings_no_overlap EXCLUDE USING gist (
        int8range(resource_key, resource_key, '[]') WITH &&,
        tstzrange(block_start, block_end, '[)') WITH &&) WHERE (cancelled_at IS NULL)
);
"""


def pg_endpoint_table(settings: Settings) -> str:
    return f'"{pg_endpoint_schema(settings)}".bookings'


async def pg_book(request: Request) -> Response:
    body = orjson.loads(await request.body())
    row_id = uuid.uuid4().hex
    async with request.app.state.pg.acquire() as conn:
        inserted = await conn.fetchval(
            request.app.state.pg_insert, row_id, body["resourceId"],
            datetime.fromisoformat(body["start"]), datetime.fromisoformat(body["end"]))
    if inserted:
        return _json({"id": row_id}, 201)
    return _json({"error": "slot taken"}, 409)


async def pg_release(request: Request) -> Response:
    body = orjson.loads(await request.body())
    async with request.app.state.pg.acquire() as conn:
        done = await conn.execute(request.app.state.pg_cancel, body["id"])
    return _json({"released": done == "UPDATE 1"}, 200 if done == "UPDATE 1" else 409)


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True,
                                         max_connections=None)
        access = RedisAccess(client)
        await access.load_scripts()
        app.state.access = access
        app.state.keys = KeySpace(settings.key_prefix, settings.shards)
        app.state.max_units = settings.max_hold_units
        table = pg_endpoint_table(settings)
        app.state.pg_insert = (
            f"INSERT INTO {table} (id, resource_id, resource_key, block_start, block_end) "
            "VALUES ($1, $2, hashtextextended($2, 0), $3, $4) ON CONFLICT DO NOTHING "
            "RETURNING true")
        app.state.pg_cancel = f"UPDATE {table} SET cancelled_at = now() WHERE id = $1"
        # asyncpg's default pool size; idle connections close soon (the database is shared).
        app.state.pg = await asyncpg.create_pool(
            "postgresql://" + settings.database_url.partition("://")[2], min_size=0,
            max_size=10, max_inactive_connection_lifetime=10.0)
        try:
            yield
        finally:
            await client.aclose()
            await app.state.pg.close()

    return Starlette(routes=[Route("/hello", hello, methods=["GET"]),
                             Route("/holds", place, methods=["POST"]),
                             Route("/holds/release", release, methods=["POST"]),
                             Route("/pg/bookings", pg_book, methods=["POST"]),
                             Route("/pg/bookings/release", pg_release, methods=["POST"])],
                     lifespan=lifespan)


def app_from_env() -> Starlette:
    return create_app(Settings.from_env())
