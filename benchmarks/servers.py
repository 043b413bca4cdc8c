"""Subprocesses a run needs: HTTP servers (the API, the baseline app) and commit-queue workers.

Every process is started in its own session and stopped by its own pid (SIGTERM, then
SIGKILL after a grace period); a run leaves none behind. The settings reach them through the
environment, field by field (engine/settings.py names).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cpu import process_cpu_s
from engine.settings import Settings, env_name


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        env[env_name(f.name)] = str(int(value)) if isinstance(value, bool) else str(value)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Managed:
    """One child process (and the processes it forks, e.g. uvicorn workers)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.proc = subprocess.Popen(args, env=env, stdout=log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        """This process and its descendants (through /proc/<pid>/task/*/children)."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    todo += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    pass
        return pids

    def cpu_s(self) -> float:
        return sum(process_cpu_s(p) or 0.0 for p in self.tree())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the tree only
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_http(managed: Managed, port: int, path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    request = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if not managed.alive():
            raise RuntimeError(f"{managed.name} exited:\n{managed.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    managed.stop()
    raise RuntimeError(f"{managed.name} did not answer {path} in {timeout_s}s:\n"
                       f"{managed.tail()}")


def _has_cli() -> bool:
    return importlib.util.find_spec("slotguard.cli") is not None


def start_api(settings: Settings, workers: int, log_dir: Path) -> tuple[Managed, int]:
    """The real API: ``slotguard serve`` (uvicorn, uvloop, httptools, no access log)."""
    port = free_port()
    if _has_cli():
        args = [sys.executable, "-m", "slotguard.cli", "serve", "--port", str(port),
                "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    else:
        args = [sys.executable, "-m", "uvicorn", "api.app:app_from_env", "--factory",
                "--port", str(port), "--workers", str(workers), "--loop", "uvloop",
                "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    managed = Managed("api", args, settings_env(settings), log_dir / "api.log")
    wait_http(managed, port, "/health/ready", timeout_s=60)
    return managed, port


def start_baseline_app(settings: Settings, workers: int, log_dir: Path) -> tuple[Managed, int]:
    """The baseline app on the same uvicorn setup as the API."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "benchmarks.baseline_app:app_from_env",
            "--factory", "--port", str(port), "--workers", str(workers), "--loop", "uvloop",
            "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    managed = Managed("baseline-app", args, settings_env(settings), log_dir / "baseline.log")
    wait_http(managed, port, "/hello", timeout_s=60)
    return managed, port


def start_worker(settings: Settings, index: int, log_dir: Path) -> Managed:
    """A commit-queue worker: ``python -m jobs`` (what ``slotguard worker`` runs)."""
    return Managed(f"worker-{index}", [sys.executable, "-m", "jobs"], settings_env(settings),
                   log_dir / f"worker-{index}.log")
