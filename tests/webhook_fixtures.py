"""Fixtures of the events-out tests (issue 14): the app with webhook settings, a real
receiver (Starlette under uvicorn on a free port) that verifies every signature with the
``standardwebhooks`` package and records what it got, and the worker's two loops (the
commit-queue drain and the webhook dispatcher) running in the test's event loop."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import pytest
import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.settings import Settings
from engine.webhook_delivery import Dispatcher
from jobs.commit_queue import CommitQueue


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=2_000, ip_rate_burst=4_000,
                            partner_rate_per_minute=600_000, ip_rate_per_minute=1_200_000,
                            webhook_allow_private=True,
                            webhook_retry_schedule_s="0.2,0.5,1",
                            webhook_timeout_ms=1_000, webhook_poll_ms=50,
                            drain_block_ms=100, events_stream_poll_ms=50,
                            events_stream_heartbeat_ms=300)


@dataclass
class Received:
    name: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    verified_with: list[int]  # indexes of the endpoint's secrets that verify it

    @property
    def event(self) -> dict:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """POST /hook/<name>: answers from ``script[name]`` (status, headers, delay s) in turn,
    then 200; records every request with the secrets (``secrets[name]``) that verify it."""

    port: int = 0
    secrets: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    script: dict[str, list[tuple[int, dict, float]]] = field(
        default_factory=lambda: defaultdict(list))
    hang: set[str] = field(default_factory=set)  # names that never answer
    # name -> a coroutine function awaited (after recording) before answering
    gate: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    got: list[Received] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    def of(self, name: str, delivered_only: bool = False) -> list[Received]:
        return [r for r in self.got if r.name == name]

    async def handle(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        headers = dict(request.headers)
        verified = []
        for i, secret in enumerate(self.secrets[name]):
            try:
                Webhook(secret).verify(body, headers)
                verified.append(i)
            except WebhookVerificationError:
                pass
        self.got.append(Received(name, headers, body, time.monotonic(), verified))
        if name in self.hang:
            await asyncio.sleep(3600)
        if name in self.gate:
            await self.gate[name]()
        if self.script[name]:
            status, extra, delay = self.script[name].pop(0)
            if delay:
                await asyncio.sleep(delay)
            return Response(status_code=status, headers=extra)
        return Response(status_code=200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = Starlette(routes=[Route("/hook/{name}", rec.handle, methods=["POST"])])
    for _ in range(5):
        rec.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=rec.port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        for _ in range(400):
            if server.started or task.done():
                break
            await asyncio.sleep(0.025)
        if server.started:
            break
    assert server.started, "the receiver did not start"
    yield rec
    server.should_exit = True
    server.force_exit = True
    try:
        await asyncio.wait_for(task, timeout=10)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        task.cancel()


class Loops:
    """The worker's commit-queue drain and webhook dispatcher, in this event loop."""

    def __init__(self, app, settings: Settings) -> None:
        svc = app.state.services
        self.stop = asyncio.Event()
        self.queue = CommitQueue(svc.access, svc.keyspace, svc.pool, svc.reservations.engine,
                                 settings, "test-consumer")
        self.dispatcher = Dispatcher(svc.pool, settings)
        self.tasks = [asyncio.create_task(self.queue.run(self.stop)),
                      asyncio.create_task(self.dispatcher.run(self.stop))]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), timeout=30)


@pytest.fixture
async def worker_loops(app, migrated):
    loops = Loops(app, migrated)
    yield loops.dispatcher
    await loops.close()
