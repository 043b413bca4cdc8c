"""Item 10 of issue 11: a real ``slotguard serve`` (uvicorn subprocess) driven over raw
sockets. Unfinished 16 MB headers are cut off (431 or closed) without the server's memory
growing past a bound; a client that never finishes its headers, or its body, is disconnected
(408); too many headers are refused (431)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.faults.edge_servers import clean_shared_redis, cli, env_for, free_port, spawn, stop

HEADER_TIMEOUT_MS = 1_500
BODY_TIMEOUT_MS = 1_500
MAX_HEADER_BYTES = 16_384
BIG = 16 * 1024 * 1024
CONNECTIONS = 20
RSS_GROWTH_BOUND = 64 * 1024 * 1024  # 20 unbounded 16 MB heads would be 320 MB


@pytest.fixture
def server(settings, tmp_path):
    env = env_for(settings, REDIS_URL,
                  SLOTGUARD_HEADER_READ_TIMEOUT_MS=str(HEADER_TIMEOUT_MS),
                  SLOTGUARD_BODY_READ_TIMEOUT_MS=str(BODY_TIMEOUT_MS),
                  SLOTGUARD_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
                  SLOTGUARD_AUTH_FAILURE_BURST="2", SLOTGUARD_AUTH_FAILURE_RATE_PER_MINUTE="1")
    cli(env, "migrate")
    admin_key = cli(env, "keys", "create", "--role", "admin").strip().splitlines()[-1]
    port = free_port()
    proc = spawn(env, tmp_path / "api.log", "serve", "--port", str(port), "--no-access-log")
    try:
        deadline = time.monotonic() + 60
        while not _live(port):
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)
        yield proc, port, admin_key
    finally:
        stop(proc)
        clean_shared_redis(REDIS_URL, settings.key_prefix)
        subprocess.run(["psql", settings.database_url, "-qc",
                        f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'],
                       capture_output=True, check=False)


def _live(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_reply(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sent before closing (b"" if it closed without a word)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_unfinished_16mb_headers_are_cut_off_without_memory_growth(server):
    proc, port, _ = server
    before = rss(proc.pid)
    sockets, sent = [], []
    chunk = b"a" * 65536
    try:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sockets.append(sock)
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Big: ")
            total = 0
            try:
                while total < BIG:
                    sock.sendall(chunk)
                    total += len(chunk)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass
            sent.append(total)
        grown = rss(proc.pid) - before
        for sock in sockets:
            reply = read_reply(sock, 30)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 431"), reply[:80]
    finally:
        for sock in sockets:
            sock.close()
    assert all(total < BIG for total in sent), sent  # every connection was cut off
    assert grown < RSS_GROWTH_BOUND, grown
    assert proc.poll() is None and _live(port)


def test_a_client_that_never_finishes_its_headers_is_disconnected(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        closed = False
        # One header every 200 ms, for up to 30 s: each byte used to reset every timer.
        while time.monotonic() - started < 30:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.2)
            try:
                data = sock.recv(4096)
            except socket.timeout:
                continue
            except ConnectionResetError:
                closed = True
                break
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
            closed = True
            break
        assert closed, "the slow client was never disconnected"


def test_a_body_that_never_arrives_is_timed_out(server):
    _, port, admin_key = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/admin/partners HTTP/1.1\r\nHost: t\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + admin_key.encode()
                     + b"\r\nContent-Length: 100\r\n\r\n{\"id\"")
        reply = read_reply(sock, 30)  # socket.timeout here: the connection stayed open
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert b'"REQUEST_TIMEOUT"' in reply


def test_too_many_headers_are_refused(server):
    _, port, _ = server
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
        reply = read_reply(sock, 30)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:80]
        assert b'"HEADERS_TOO_LARGE"' in reply


def test_uvicorn_does_not_take_forwarded_for_from_loopback(server):
    """uvicorn trusts X-Forwarded-For from loopback by default; ``serve`` turns that off, so
    the failed-authentication limiter counts the real peer whatever the header says."""
    import json

    _, port, _ = server
    replies = []
    for spoofed in ("203.0.113.1", "203.0.113.2", "garbage"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /v1/ops/audit HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                         b"Authorization: Bearer sg_live_0123456789ab_" + b"A" * 43 +
                         b"\r\nX-Forwarded-For: " + spoofed.encode() + b"\r\n\r\n")
            replies.append(read_reply(sock, 30))
    assert [r[9:12] for r in replies] == [b"401", b"401", b"429"], [r[:40] for r in replies]
    body = json.loads(replies[2].split(b"\r\n\r\n", 1)[1])
    assert body["error"]["details"]["clientIp"] == "127.0.0.1"
