"""A whole slotguard stack of real processes that a fault test or ``slotguard chaos`` breaks.

:class:`FaultStack` starts a private Redis and a private Postgres (``initdb`` into a temp
dir, free loopback ports: :class:`slotguard.embedded.EmbeddedServers`), migrates the schema,
creates partners, a vendor and their API keys, then runs ``slotguard serve`` and one or more
``slotguard worker`` processes against them. Every server and process can be killed
(``kill -9``), paused (``SIGSTOP``/``SIGCONT``), stopped and started again on the same port.

Nothing here touches a server it did not start: the shared Redis and Postgres of the
machine are never named. Waits are conditions with an overall bound, never a sleep to an
edge (a loaded machine is normal).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from slotguard import embedded
from slotguard.embedded import EmbeddedServers, free_port

log = logging.getLogger("slotguard.faults")

VENDOR = "salon"  # confirmation required, free: create -> vendor-confirmation -> commit
UNIT_MINUTES = 15
PARTNERS = ("p1", "p2", "p3")
WAIT_BOUND_S = 120.0  # the overall bound of every wait (generous: a loaded machine is normal)

# Settings every fault run uses (engine/settings.py names): no rate limit or cap gets in the
# way of the traffic, and API keys stay cached while Postgres is away (the partners keep
# committing during a Postgres outage; auth would otherwise need Postgres every 5 s).
BASE_ENV = {
    "SLOTGUARD_SHARDS": "4",
    "SLOTGUARD_PARTNER_MAX_LIVE_HOLDS": "0",
    "SLOTGUARD_PARTNER_RATE_PER_MINUTE": "0",
    "SLOTGUARD_IP_RATE_PER_MINUTE": "0",
    "SLOTGUARD_API_KEY_CACHE_MS": "3600000",
}


class FaultServers(EmbeddedServers):
    """Embedded servers that can also be killed, stopped and started again on their port."""

    def start(self) -> tuple[str, str]:
        urls = super().start()
        # The exact command lines (ports included) to start each server again.
        self._redis_args = list(self._redis.args)
        self._postgres_args = list(self._postgres.args)
        return urls

    # Redis.
    def kill_redis(self, sig: int = signal.SIGKILL) -> None:
        _signal_and_reap(self._redis, sig)

    def start_redis(self) -> float:
        """Start Redis again on its port (it reloads its append-only file); answers the
        monotonic time at which it answered PING."""
        if self._redis is not None and self._redis.poll() is None:
            raise RuntimeError("Redis is still running")
        port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        self._redis = embedded._spawn(self._redis_args, self.redis_log, cwd=self.redis_dir,
                                      death_signal=signal.SIGTERM)
        return _wait_answers(lambda: embedded._redis_answers(port), self._redis, "Redis")

    def redis_running(self) -> bool:
        return self._redis is not None and self._redis.poll() is None

    # Postgres.
    def stop_postgres(self, sig: int = signal.SIGINT) -> None:
        """SIGINT: fast shutdown (clients are disconnected); SIGKILL: a crash."""
        _signal_and_reap(self._postgres, sig)

    def start_postgres(self) -> float:
        if self._postgres is not None and self._postgres.poll() is None:
            raise RuntimeError("Postgres is still running")
        port = int(self.database_url.rsplit(":", 1)[1].split("/")[0])
        pid_file = self.postgres_dir / "postmaster.pid"
        if pid_file.exists():  # left by a kill -9: the postmaster is gone, its file is not
            embedded._stop_orphan(pid_file, self.postgres_dir, signal.SIGINT)
        user = self._postgres_user()
        if user is not None:  # someone may have taken a parent's search bit away meanwhile
            embedded._make_reachable(self.postgres_dir, user)
        self._postgres = embedded._spawn(self._postgres_args, self.postgres_log,
                                         cwd=self.postgres_dir, user=user,
                                         death_signal=signal.SIGINT)
        return _wait_answers(lambda: embedded._postgres_answers(port), self._postgres,
                             "Postgres")

    def postgres_running(self) -> bool:
        return self._postgres is not None and self._postgres.poll() is None


def _signal_and_reap(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=embedded.STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_answers(answers, proc: subprocess.Popen, what: str) -> float:
    deadline = time.monotonic() + WAIT_BOUND_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) while starting again")
        if answers():
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not answer within {WAIT_BOUND_S:.0f}s")


@dataclass
class Keys:
    partners: dict[str, str] = field(default_factory=dict)  # partner id -> API key
    vendor: str = ""
    ops: str = ""


class FaultStack:
    """Private servers, the API and workers, with the settings given in ``env``.

    ``async with FaultStack(tmp_dir, workers=2, env={...}) as stack`` starts everything and
    waits for readiness; leaving stops the processes and then the servers.
    """

    def __init__(self, data_dir: Path | str, *, workers: int = 2,
                 env: Mapping[str, str] | None = None, cluster: int = 0,
                 stall_proxy: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.servers = FaultServers(self.data_dir / "servers")
        self.worker_names = [f"worker-{i}" for i in range(workers)]
        self.extra_env = {**BASE_ENV, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.intentionally_down: set[str] = set()  # killed or stopped by the fault, not a bug
        self.api_port = 0
        self.keys = Keys()
        self.env: dict[str, str] = {}
        self.settings = None
        # Issue 15: a local Redis Cluster of ``cluster`` masters (with a replica each) for
        # the hot path, the embedded single Redis then keeping arq's cron queue. With
        # ``stall_proxy``, on a single Redis the API reaches it through a proxy that can
        # stall; on a cluster every node sits behind one, announced to every client.
        self.cluster_masters = cluster
        self.cluster = None  # slotguard.local_cluster.LocalCluster
        self.want_proxy = stall_proxy
        self.proxy = None  # slotguard.stall_proxy.StallProxy
        self.api_env: dict[str, str] = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def __aenter__(self) -> FaultStack:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)

    # ---- start and stop ---------------------------------------------------------------
    async def start(self) -> None:
        from engine import metrics
        from engine.settings import Settings

        redis_url, database_url = await asyncio.to_thread(self.servers.start)
        multiproc = self.data_dir / "metrics"
        metrics.reset_multiprocess_dir(multiproc)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SLOTGUARD_") and k not in ("REDIS_URL", "DATABASE_URL")}
        self.env.update(self.extra_env, REDIS_URL=redis_url, DATABASE_URL=database_url,
                        PROMETHEUS_MULTIPROC_DIR=str(multiproc.resolve()))
        if self.cluster_masters:
            from slotguard.local_cluster import LocalCluster

            self.cluster = LocalCluster(masters=self.cluster_masters, replicas=1,
                                        base_dir=self.data_dir / "cluster",
                                        stall_proxies=self.want_proxy)
            await asyncio.to_thread(self.cluster.start)
            self.env.update(REDIS_URL=self.cluster.seed_url, SLOTGUARD_REDIS_CLUSTER="true",
                            SLOTGUARD_ARQ_REDIS_URL=redis_url)
        elif self.want_proxy:
            from urllib.parse import urlparse

            from slotguard.stall_proxy import StallProxy

            target = urlparse(redis_url)
            self.proxy = StallProxy(target.hostname, target.port).start()
            self.api_env = {"REDIS_URL": self.proxy.url}
        self.settings = Settings.from_env(self.env)
        self.keys = await prepare(self.settings)
        self.api_port = free_port()
        self.start_process("api")
        for name in self.worker_names:
            self.start_process(name)
        if await self.wait_ready() is None:
            raise RuntimeError(f"the stack was not ready within {WAIT_BOUND_S:.0f}s; "
                               f"API log:\n{self.log_tail('api')}")

    def stall(self) -> None:
        """Stop forwarding between the clients and Redis (``stall_proxy=True``)."""
        (self.cluster if self.cluster is not None else self.proxy).stall()

    def resume_network(self) -> None:
        (self.cluster if self.cluster is not None else self.proxy).resume()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused process cannot stop otherwise
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.proxy is not None:
            self.proxy.stop()
        if self.cluster is not None:
            self.cluster.stop()
        self.servers.stop()

    # ---- our processes ----------------------------------------------------------------
    def start_process(self, name: str) -> subprocess.Popen:
        """Start (or start again) ``api`` or ``worker-N``; the API keeps its port."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running")
        cli = [sys.executable, "-m", "slotguard"]
        if name == "api":
            args = [*cli, "serve", "--host", "127.0.0.1", "--port", str(self.api_port),
                    "--no-access-log", "--log-level", "warning"]
        elif name in self.worker_names:
            args = [*cli, "worker"]
        else:
            raise ValueError(f"no process named {name!r}")
        with open(self.log_path(name), "ab") as out:
            env = {**self.env, **self.api_env} if name == "api" else self.env
            proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=embedded._death_signal_setter(signal.SIGTERM))
        self.procs[name] = proc
        self.intentionally_down.discard(name)
        return proc

    def log_path(self, name: str) -> Path:
        return self.data_dir / f"{name}.log"

    def kill(self, name: str) -> None:
        """kill -9 one of our processes."""
        self.intentionally_down.add(name)
        _signal_and_reap(self.procs[name], signal.SIGKILL)

    def pause(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGCONT)

    def consumer(self, name: str) -> str:
        """The commit-queue consumer name of a worker process (jobs.worker.consumer_name)."""
        return f"{socket.gethostname()}-{self.procs[name].pid}"

    async def pending_of(self, name: str) -> int:
        """Commit-queue entries delivered to this worker and not yet acknowledged."""
        import redis.asyncio as aioredis

        from engine.connection import open_redis
        from engine.keys import KeySpace
        from jobs.commit_queue import GROUP

        keys = KeySpace(self.settings.key_prefix, self.settings.shards)
        client = open_redis(self.settings, health_check_interval=0)
        try:
            pending = 0
            for shard in range(keys.shards):
                try:
                    pending += len(await client.xpending_range(
                        keys.events(shard), GROUP, min="-", max="+", count=1000,
                        consumername=self.consumer(name)))
                except aioredis.ResponseError:  # no group yet
                    pass
            return pending
        finally:
            await client.aclose()

    async def pause_mid_drain(self, name: str, timeout_s: float = WAIT_BOUND_S) -> int:
        """SIGSTOP the worker at a moment it holds delivered, unacknowledged entries (it is
        left paused; answers how many). Pause, look, resume and look again until so: no
        race to win, a paused process cannot acknowledge. 0 if the bound passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pause(name)
            pending = await self.pending_of(name)
            if pending:
                return pending
            self.resume(name)
            await asyncio.sleep(0.02)
        return 0

    def exited(self) -> dict[str, int]:
        """Processes that exited without the fault asking them to: name -> return code."""
        return {name: proc.returncode for name, proc in self.procs.items()
                if proc.poll() is not None and name not in self.intentionally_down}

    def log_tail(self, name: str, lines: int = 30) -> str:
        return embedded._tail(self.log_path(name), lines)

    # ---- readiness --------------------------------------------------------------------
    async def ready(self, client: httpx.AsyncClient) -> bool:
        """``/health/ready`` answers 200 and the holds are ready (markers rehydrated)."""
        try:
            r = await client.get(f"{self.api_url}/health/ready", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("holdsReady") is True

    async def wait_ready(self, since: float | None = None,
                         timeout_s: float = WAIT_BOUND_S) -> float | None:
        """Seconds from ``since`` (monotonic; default now) until ready; None if the bound
        passed first."""
        since = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if await self.ready(client):
                    return time.monotonic() - since
                await asyncio.sleep(0.05)
        return None


async def prepare(settings) -> Keys:
    """Migrate; create the partners, the vendor and one key per partner, vendor and ops."""
    from api.auth import issue_key
    from engine import directory
    from engine.db import create_pool, migrate

    await asyncio.to_thread(migrate, settings)
    pool = await create_pool(settings, max_size=2)
    keys = Keys()
    try:
        async with pool.acquire() as conn:
            for partner in PARTNERS:
                await directory.create_partner(conn, partner, partner.upper())
                issued, _ = await issue_key(conn, "partner", partner_id=partner)
                keys.partners[partner] = issued.key
            await directory.create_vendor(conn, VENDOR, unit_minutes=UNIT_MINUTES,
                                          confirmation_required=True, payment_required=False)
            keys.vendor = (await issue_key(conn, "vendor", vendor_id=VENDOR))[0].key
            keys.ops = (await issue_key(conn, "ops"))[0].key
    finally:
        await pool.close()
    return keys
