"""A small HTTP/1.1 load client: raw asyncio streams, one keep-alive connection per task.

No client library on the wire: httpx and aiohttp spend more CPU per request than the server
under test on this kind of machine, and then the figure is the client's. The partner routes
are the partner client's (``slotguard.client.RequestBuilder`` builds each request, its
``http11`` writes the bytes, ``ApiError.from_response`` reads an error): one definition of
paths, bodies and headers for the client, the bench and the locustfile. The bench does not
retry: a 429/5xx is an error of the phase, counted, not hidden. Each process measures its own
CPU (``client_cpu_per_process`` in the results; near 1.0 means the client was the limit).

Kinds: ``create`` (POST /v1/reservations, then cancel a win when ``release_winners``),
``walk`` (create, vendor-confirmation, commit: the lifecycle through the API),
``create_commit`` (create, commit: an instant, free vendor's lifecycle),
``hello`` (GET /hello on the baseline app: the HTTP ceiling) and ``bare_hold``
(POST /holds on the baseline app: one bare EVALSHA per request), ``pg_endpoint`` (POST
/pg/bookings on the baseline app: one asyncpg INSERT ... ON CONFLICT DO NOTHING against an
exclusion constraint per request; a win is released at once when ``release_winners``).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson

from benchmarks import history as h
from benchmarks.load import LoadSpec, ResourceSpec, Workload, iso
from benchmarks.stats import Recorder
from slotguard.client import ApiError, RequestBuilder, http11


class HttpError(Exception):
    pass


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at < 0:
                raise HttpError("response without content-length")
            length = int(lower[at + 15:lower.index(b"\r\n", at)])
            body = await self.reader.readexactly(length) if length else b""
            if b"connection: close" in lower:
                self.close()
            return status, body
        except BaseException:
            self.close()
            raise


def build_request(method: str, path: str, host: str, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append("content-type: application/json")
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpWorkload(Workload):
    def __init__(self, kind: str) -> None:
        if kind not in ("create", "walk", "create_commit", "hello", "bare_hold",
                        "pg_endpoint"):
            raise ValueError(f"unknown HTTP workload {kind!r}")
        self.kind = kind

    async def open(self, spec: LoadSpec) -> None:
        http = spec.http
        self.host, self.port = http.get("host", "127.0.0.1"), int(http["port"])
        self.hostname = f"{self.host}:{self.port}"
        self.partner_auth = {"authorization": f"Bearer {http['partner_key']}"} \
            if http.get("partner_key") else {}
        self.vendor_auth = {vendor: {"authorization": f"Bearer {key}"}
                            for vendor, key in (http.get("vendor_keys") or {}).items()}
        self.idempotency = bool(http.get("idempotency", True))
        self.release = spec.release_winners
        self.free: asyncio.Queue[Connection] = asyncio.Queue()
        conns = [Connection(self.host, self.port) for _ in range(spec.concurrency)]
        await asyncio.gather(*(c.open() for c in conns))
        for conn in conns:
            self.free.put_nowait(conn)
        self.hello = build_request("GET", "/hello", self.hostname)
        self.routes = RequestBuilder()
        self.pg_table = http.get("pg_table", "")

    async def close(self) -> None:
        while not self.free.empty():
            self.free.get_nowait().close()

    async def _call(self, raw: bytes) -> tuple[int, bytes]:
        conn = await self.free.get()
        try:
            return await conn.request(raw)
        finally:
            self.free.put_nowait(conn)

    async def attempt(self, resource: ResourceSpec, start: int, end: int, rec: Recorder,
                      out: list) -> None:
        if self.kind == "hello":
            sent = time.monotonic()
            try:
                status, _ = await self._call(self.hello)
                outcome = h.OK if status == 200 else h.ERROR
            except (OSError, HttpError, asyncio.IncompleteReadError):
                outcome = h.ERROR
            rec.record(outcome, sent, time.monotonic())
            return
        if self.kind == "bare_hold":
            await self._bare_hold(resource, start, end, rec, out)
            return
        if self.kind == "pg_endpoint":
            await self._pg_endpoint(resource, start, end, rec, out)
            return
        reservation_id = await self._create(resource, start, end, rec, out)
        if reservation_id is None:
            return
        if self.kind == "create_commit":  # an instant, free vendor: straight to commit
            await self._act(reservation_id, "commit", h.COMMIT, self.partner_auth, rec, out,
                            resource)
            return
        if self.kind == "create":
            if self.release:  # in the history, not in the rate: decisions/s as elsewhere
                await self._act(reservation_id, "cancel", h.CANCEL, self.partner_auth, None,
                                out, resource)
            return
        if not await self._act(reservation_id, "vendor-confirmation", "confirm",
                               self.vendor_auth.get(resource.vendor_id, {}), rec, out,
                               resource):
            return
        await self._act(reservation_id, "commit", h.COMMIT, self.partner_auth, rec, out,
                        resource)

    async def _create(self, resource, start, end, rec, out) -> str | None:
        first, last = resource.units(start, end)
        call = self.routes.create_reservation(
            vendor_id=resource.vendor_id, resource_id=resource.id, slot_start_time=iso(start),
            slot_end_time=iso(end), requester_id="bench",
            idempotency_key=uuid.uuid4().hex if self.idempotency else None)
        raw = http11(call, self.hostname, self.partner_auth)
        status, payload, sent, answered = await self._timed(raw)
        if status == 201:
            rid = orjson.loads(payload)["reservationId"]
            rec.record(h.OK, sent, answered)
            out.append(h.Entry(h.CREATE, h.OK, rid, resource.id, first, last, sent, answered))
            return rid
        if status == 409:
            details = ApiError.from_response(status, payload, {}).details
            rec.record(h.CONFLICT, sent, answered)
            out.append(h.Entry(h.CREATE, h.CONFLICT, "", resource.id, first, last, sent,
                               answered, holder=details.get("conflictingReservationId", ""),
                               unit=_unit(details)))
            return None
        rec.record(h.ERROR, sent, answered)
        out.append(h.Entry(h.CREATE, h.ERROR, "", resource.id, first, last, sent, answered,
                           holder=f"status {status}: {payload[:200]!r}"))
        return None

    async def _timed(self, raw: bytes) -> tuple[int, bytes, float, float]:
        """Status, body, and when the request left and its answer arrived (status 0 when
        the connection failed)."""
        sent = time.monotonic()
        try:
            status, payload = await self._call(raw)
        except (OSError, HttpError, asyncio.IncompleteReadError):
            status, payload = 0, b""
        return status, payload, sent, time.monotonic()

    async def _act(self, rid, action, op, auth, rec, out, resource) -> bool:
        raw = http11(self.routes.act(rid, action), self.hostname, auth)
        status, payload, sent, answered = await self._timed(raw)
        ok = status in (200, 202)
        if rec is not None:
            rec.record(h.OK if ok else h.ERROR, sent, answered)
        out.append(h.Entry(op, h.OK if ok else h.ERROR, rid, resource.id, 0, -1, sent,
                           answered, holder="" if ok else f"status {status}: {payload[:200]!r}"))
        return ok

    async def _bare_hold(self, resource, start, end, rec, out) -> None:
        first, last = resource.units(start, end)
        body = orjson.dumps({"resourceId": resource.id, "first": first, "last": last})
        raw = build_request("POST", "/holds", self.hostname, body)
        status, payload, sent, answered = await self._timed(raw)
        if status == 201:
            reply = orjson.loads(payload)
            rec.record(h.OK, sent, answered)
            out.append(h.Entry(h.PLACE, h.OK, reply["holdId"], resource.id, first, last, sent,
                               answered, expires_ms=reply["expiresAt"]))
            if self.release:
                release = build_request("POST", "/holds/release", self.hostname, orjson.dumps(
                    {"holdId": reply["holdId"], "fenceToken": reply["fenceToken"]}))
                sent = time.monotonic()
                try:
                    status, _ = await self._call(release)
                except (OSError, HttpError, asyncio.IncompleteReadError):
                    status = 0
                out.append(h.Entry(h.RELEASE, h.OK if status == 200 else h.ERROR,
                                   reply["holdId"], resource.id, first, last, sent,
                                   time.monotonic()))
        elif status == 409:
            reply = orjson.loads(payload)
            rec.record(h.CONFLICT, sent, answered)
            out.append(h.Entry(h.PLACE, h.CONFLICT, "", resource.id, first, last, sent,
                               answered, holder=reply["holder"], unit=reply["unit"]))
        else:
            rec.record(h.ERROR, sent, answered)
            out.append(h.Entry(h.PLACE, h.ERROR, "", resource.id, first, last, sent, answered))


    async def _pg_endpoint(self, resource, start, end, rec, out) -> None:
        first, last = resource.units(start, end)
        body = orjson.dumps({"resourceId": resource.id, "start": iso(first * resource.unit_ms),
                             "end": iso((last + 1) * resource.unit_ms)})
        raw = build_request("POST", "/pg/bookings", self.hostname, body)
        status, payload, sent, answered = await self._timed(raw)
        if status == 201:
            row_id = orjson.loads(payload)["id"]
            rec.record(h.OK, sent, answered)
            out.append(h.Entry(h.PG_INSERT, h.OK, row_id, resource.id, first, last, sent,
                               answered, table=self.pg_table))
            if self.release:
                release = build_request("POST", "/pg/bookings/release", self.hostname,
                                        orjson.dumps({"id": row_id}))
                status, _, sent, answered = await self._timed(release)
                out.append(h.Entry(h.RELEASE, h.OK if status == 200 else h.ERROR, row_id,
                                   resource.id, first, last, sent, answered,
                                   table=self.pg_table))
        elif status == 409:
            rec.record(h.CONFLICT, sent, answered)
            out.append(h.Entry(h.PG_INSERT, h.CONFLICT, "", resource.id, first, last, sent,
                               answered, table=self.pg_table))
        else:
            rec.record(h.ERROR, sent, answered)
            out.append(h.Entry(h.PG_INSERT, h.ERROR, "", resource.id, first, last, sent,
                               answered, holder=f"status {status}: {payload[:200]!r}",
                               table=self.pg_table))


def _unit(details: dict) -> int:
    """The conflicting unit index when the server names one (-1 when it does not)."""
    try:
        return int(details.get("conflictingUnit", -1))
    except (TypeError, ValueError):
        return -1
