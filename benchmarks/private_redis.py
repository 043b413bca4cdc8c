"""A private redis-server for the measurements that must not touch the shared one.

The ``redis_cost`` and ``scale`` scenarios need what a shared Redis cannot give: ``CONFIG
SET`` (the slow log at 0 µs, to attribute time to scripts), counters (``INFO commandstats``,
``total_reads_processed``, ``used_memory``) and process CPU that only this run moves, and room
for 10^6 live reservations (``maxmemory`` large, ``noeviction``). The binary is the one
:func:`slotguard.embedded.find_binaries` finds (the same redis-server as the shared one on
this machine); no persistence, its own temporary directory, stopped by its own pid.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.servers import free_port


class PrivateRedis:
    def __init__(self, *, maxmemory_mb: int = 512) -> None:
        from slotguard.embedded import find_binaries

        binary = find_binaries().redis_server
        if binary is None:
            raise RuntimeError("no redis-server binary found for the private Redis")
        self.dir = Path(tempfile.mkdtemp(prefix="slotguard-bench-redis-"))
        self.port = free_port()
        self.maxmemory_mb = maxmemory_mb
        self.proc = subprocess.Popen(
            [str(binary), "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.dir), "--save", "", "--appendonly", "no",
             "--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction",
             "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private redis-server exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("private redis-server did not answer in 30 s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
