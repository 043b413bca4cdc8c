"""The worker's webhook dispatcher in its own process (issue 14, jobs/webhook_process.py):
a real ``python -m jobs`` worker delivers through its child process to the real receiver,
restarts the child when it dies, and a SIGKILLed worker leaves no sender behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_webhooks_delivery import register
from tests.timing import eventually
from tests.webhook_fixtures import api_settings, receiver  # noqa: F401  (fixtures)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(settings, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url,
        "SLOTGUARD_KEY_PREFIX": settings.key_prefix, "SLOTGUARD_DB_SCHEMA": settings.db_schema,
        "SLOTGUARD_SHARDS": str(settings.shards), "SLOTGUARD_DRAIN_BLOCK_MS": "100",
        "SLOTGUARD_WEBHOOK_ALLOW_PRIVATE": "true", "SLOTGUARD_WEBHOOK_POLL_MS": "50",
        "SLOTGUARD_WEBHOOK_RETRY_SCHEDULE_S": "0.2,0.5,1",
        "SLOTGUARD_WEBHOOK_DISPATCHER": "process",
    })
    return subprocess.Popen([sys.executable, "-m", "jobs"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def test_the_worker_delivers_through_its_dispatcher_process(client, world, receiver,
                                                                  migrated, tmp_path):
    await register(client, world, receiver, "p1", "p1", ["reservation.created"])
    worker = start(migrated, tmp_path / "worker.log")
    try:
        async def one_child() -> bool:
            return len(children(worker.pid)) == 1

        await eventually(one_child, timeout_s=120, what="the dispatcher process")
        [child] = children(worker.pid)
        r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
        assert r.status_code == 201, r.text
        first = r.json()["reservationId"]

        async def got(rid: str) -> bool:
            return any(g.event["data"]["reservationId"] == rid for g in receiver.of("p1"))

        await eventually(lambda: got(first), timeout_s=120, what="the webhook")
        # The child dies: the worker starts another, which delivers the next event.
        os.kill(child, signal.SIGKILL)

        async def replaced() -> bool:
            now = children(worker.pid)
            return len(now) == 1 and now[0] != child

        await eventually(replaced, timeout_s=120, what="a new dispatcher process")
        [child] = children(worker.pid)
        r = await client.post("/v1/reservations", json=create_body(start=60),
                              headers=world.auth("p1"))
        assert r.status_code == 201, r.text
        second = r.json()["reservationId"]
        await eventually(lambda: got(second), timeout_s=120, what="the next webhook")
        assert all(g.verified_with == [0] for g in receiver.of("p1"))
        # The worker is SIGKILLed (no shutdown runs): its child stops by itself.
        worker.kill()
        worker.wait()

        async def child_gone() -> bool:
            return not alive(child)

        await eventually(child_gone, timeout_s=60, what="the orphaned dispatcher to exit")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        for pid in children(worker.pid):
            os.kill(pid, signal.SIGKILL)


async def test_a_stopped_worker_stops_its_dispatcher_process(migrated, tmp_path):
    worker = start(migrated, tmp_path / "worker.log")
    try:
        async def one_child() -> bool:
            return len(children(worker.pid)) == 1

        await eventually(one_child, timeout_s=120, what="the dispatcher process")
        [child] = children(worker.pid)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        assert not alive(child)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


async def test_a_dispatcher_whose_worker_died_before_it_looked_exits(migrated, tmp_path):
    """The worker was SIGKILLed while its child was still starting (importing): the child
    already has another parent when it first looks, and still knows its worker was another
    (the pid the worker gave it), so it exits."""
    from jobs.webhook_process import PARENT_ENV

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is nobody's parent any more
    env = dict(os.environ)
    env.update({"REDIS_URL": migrated.redis_url, "DATABASE_URL": migrated.database_url,
                "SLOTGUARD_DB_SCHEMA": migrated.db_schema, PARENT_ENV: str(gone.pid)})
    child = subprocess.Popen([sys.executable, "-m", "jobs.webhook_process"], env=env,
                             stdout=(tmp_path / "child.log").open("ab"),
                             stderr=subprocess.STDOUT)
    try:
        assert child.wait(timeout=120) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "the worker is gone" in (tmp_path / "child.log").read_text()
