"""The HTTP baselines, served by the same uvicorn setup as the API (uvloop, httptools).

- ``GET /hello``: the HTTP ceiling of one worker (nothing behind the route);
- ``POST /holds`` and ``POST /holds/release``: the minimal Starlette endpoint calling the bare
  place_hold / release_hold script, one EVALSHA per request (no coalescing, no auth, no
  idempotency, no limits). ``POST /v1/reservations`` is held against this one.

    uvicorn benchmarks.baseline_app:app_from_env --factory
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
        try:
            yield
        finally:
            await client.aclose()

    return Starlette(routes=[Route("/hello", hello, methods=["GET"]),
                             Route("/holds", place, methods=["POST"]),
                             Route("/holds/release", release, methods=["POST"])],
                     lifespan=lifespan)


def app_from_env() -> Starlette:
    return create_app(Settings.from_env())
