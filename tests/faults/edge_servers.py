"""Helpers of the edge/resilience fault tests: a private Redis this test may kill, and the
``slotguard`` processes (serve, worker) pointed at it. Never the shared servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "slotguard"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int) -> bool:
    """True when a Redis on ``port`` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A redis-server of the test's own on a free port; AOF fsynced on every write, so what
    Redis acknowledged survives a kill -9 (as an accepted commit must)."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.dir = data_dir
        self.args = [shutil.which("redis-server"), "--port", str(self.port),
                     "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                     "--appendfsync", "always", "--maxmemory-policy", "noeviction",
                     "--dir", str(data_dir), *extra]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not answers(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("private redis did not start")
            time.sleep(0.01)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def env_for(settings, redis_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": settings.database_url,
           "SLOTGUARD_KEY_PREFIX": settings.key_prefix,
           "SLOTGUARD_DB_SCHEMA": settings.db_schema, "SLOTGUARD_SHARDS": str(settings.shards)}
    env.update(extra)
    return env


def cli(env: dict, *args: str) -> str:
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def spawn(env: dict, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def clean_shared_redis(redis_url: str, prefix: str) -> None:
    """What this test's processes wrote under its prefix on a shared Redis (arq's too)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.unlink(*keys)
    finally:
        client.close()
