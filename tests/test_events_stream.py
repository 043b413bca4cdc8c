"""The live stream (issue 14): GET /v1/events/stream over a real uvicorn server. Tenancy,
filters, heartbeats, Last-Event-ID resume; bad input is a typed 4xx."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
import uvicorn

from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)
from tests.webhook_fixtures import api_settings, free_port, worker_loops  # noqa: F401


@pytest.fixture
async def served(app):
    """The app (its lifespan already run by the fixture) on a free port of its own."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning", timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started:
            break
        await asyncio.sleep(0.025)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    server.force_exit = True
    try:
        await asyncio.wait_for(task, timeout=10)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        task.cancel()


class Stream:
    """Reads one SSE connection in the background: events and heartbeats seen so far."""

    def __init__(self, base: str, headers: dict, params: dict | None = None) -> None:
        self.events: list[tuple[int, str, dict]] = []
        self.heartbeats = 0
        self.opened: int | None = None
        self.status: int | None = None
        self._task = asyncio.create_task(self._read(base, headers, params or {}))

    async def _read(self, base, headers, params) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=None) as http:
            async with http.stream("GET", "/v1/events/stream", headers=headers,
                                   params=params) as response:
                self.status = response.status_code
                fields: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line.startswith(": heartbeat"):
                        self.heartbeats += 1
                    elif line == "" and fields.get("event") == "stream.opened":
                        self.opened = orjson.loads(fields["data"])["position"]
                        fields = {}
                    elif line == "" and "data" in fields:
                        self.events.append((int(fields["id"]), fields["event"],
                                            orjson.loads(fields["data"])))
                        fields = {}
                    elif ":" in line and not line.startswith(":"):
                        name, _, value = line.partition(":")
                        fields[name] = value.lstrip(" ")

    async def wait(self, condition, timeout_s: float = 60) -> None:
        for _ in range(int(timeout_s / 0.05)):
            if condition(self):
                return
            assert not self._task.done(), self._task.exception()
            await asyncio.sleep(0.05)
        raise AssertionError(f"stream condition not reached: {self.events}")

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_stream_tenancy_filters_heartbeat_and_resume(served, client, world,
                                                           worker_loops):
    ops = Stream(served, world.auth("ops"))
    p1 = Stream(served, world.auth("p1"))
    p2 = Stream(served, world.auth("p2"))
    vendor = Stream(served, world.auth("vendor"), {"types": "reservation.cancelled"})
    # heartbeats on idle streams (every 0.3 s in these settings)
    await p2.wait(lambda s: s.heartbeats >= 2)
    r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    await ops.wait(lambda s: len(s.events) >= 3)
    await p1.wait(lambda s: len(s.events) >= 3)
    await vendor.wait(lambda s: len(s.events) >= 1)
    assert [e[1] for e in p1.events] == ["reservation.created",
                                         "reservation.awaiting_vendor_confirmation",
                                         "reservation.cancelled"]
    assert [e[0] for e in p1.events] == sorted(e[0] for e in p1.events)
    assert p1.opened is not None and p1.opened < p1.events[0][0]
    assert p1.events[0][2]["data"]["reservationId"] == rid
    assert [e[1] for e in vendor.events] == ["reservation.cancelled"]
    assert p2.events == []
    first_id = p1.events[0][0]
    for s in (ops, p1, p2, vendor):
        await s.close()

    # Resume after the first event: the rest, and what happened while away, no repeats.
    r = await client.post("/v1/reservations", json=create_body(start=120),
                          headers=world.auth("p1"))
    again = Stream(served, {**world.auth("p1"), "Last-Event-ID": str(first_id)})
    await again.wait(lambda s: len(s.events) >= 4)
    await asyncio.sleep(0.3)
    await again.close()
    assert [e[1] for e in again.events] == ["reservation.awaiting_vendor_confirmation",
                                            "reservation.cancelled", "reservation.created",
                                            "reservation.awaiting_vendor_confirmation"]
    assert again.events[0][0] == p1.events[1][0]
    assert again.events[-1][2]["data"]["reservationId"] == r.json()["reservationId"]


@pytest.mark.parametrize("key, params, headers, status, code", [
    ("p1", {"types": "reservation.exploded"}, {}, 400, "UNKNOWN_EVENT_TYPE"),
    ("p1", {"colour": "red"}, {}, 400, "UNKNOWN_PARAMETER"),
    ("p1", {}, {"Last-Event-ID": "abc"}, 400, "INVALID_FIELD"),
    ("p1", {}, {"Last-Event-ID": "-4"}, 400, "INVALID_FIELD"),
    ("p1", {"lastEventId": "x"}, {}, 400, "INVALID_FIELD"),
    ("vendor", {"vendorId": "v-other"}, {}, 404, "UNKNOWN_VENDOR"),
])
async def test_stream_bad_input(served, world, key, params, headers, status, code):
    async with httpx.AsyncClient(base_url=served, timeout=30) as http:
        r = await http.get("/v1/events/stream", params=params,
                           headers={**world.auth(key), **headers})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
