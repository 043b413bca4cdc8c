"""The webhook dispatcher in a process of its own, a child of the worker (issue 14).

The dispatcher (engine/webhook_delivery.py) is CPU-bound while a backlog lasts (request
building, signing, recording each outcome); in the worker's event loop it took the CPU the
commit-queue drain and the reaper need, so expiries and their outbox rows came seconds late
under a burst of deliveries (benchmarks/RESULTS.md, "Events out"). With
``SLOTGUARD_WEBHOOK_DISPATCHER=process`` (the default) the worker starts
``python -m jobs.webhook_process`` with its own environment, restarts it when it dies, and
stops it on shutdown (:class:`DispatcherProcess`); the child exits by itself when its parent
is gone (a SIGKILLed worker leaves no orphan sender behind). Its metrics reach the worker's
``/metrics`` through ``PROMETHEUS_MULTIPROC_DIR``, as every multi-process setup's do; a
worker that serves metrics without it keeps the dispatcher in its own loop (``task``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

log = logging.getLogger("slotguard.webhook_process")

RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 15.0
PARENT_CHECK_S = 0.5
GRACE_S = 5.0  # the child's own shutdown, bounded
PARENT_ENV = "SLOTGUARD_WEBHOOK_PARENT_PID"  # set by the worker for its child


class DispatcherProcess:
    """Runs and supervises the child process from the worker's event loop."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jobs.webhook_process",
                env={**os.environ, PARENT_ENV: str(os.getpid())})
            self.starts += 1
            exited = asyncio.ensure_future(self.proc.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                await self._stop(exited)
                self._forget(self.proc.pid)
                return
            self._forget(self.proc.pid)
            log.warning("webhook dispatcher process exited with %s; restarting",
                        self.proc.returncode)
            try:
                await asyncio.wait_for(stop.wait(), RESTART_DELAY_S)
            except asyncio.TimeoutError:
                pass

    @staticmethod
    def _forget(pid: int) -> None:
        """A dead child's live gauges leave the multiprocess metrics (none yet: its metrics
        are counters and histograms, which keep counting)."""
        from engine import metrics

        metrics.mark_process_dead(pid)

    async def _stop(self, exited: asyncio.Future) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.proc.kill()
            await exited


async def _main() -> None:
    from engine.db import create_pool
    from engine.settings import Settings
    from engine.webhook_delivery import Dispatcher

    settings = Settings.from_env()
    if settings.webhook_process_nice:
        # Below the worker's drain and reaper (and Postgres) when the CPU is short.
        os.nice(settings.webhook_process_nice)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The worker's pid as it started us: a worker killed while we were still starting has
    # already left us to another parent, so our own first getppid() would not tell.
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())

    async def watch_parent() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                log.warning("the worker is gone: the webhook dispatcher stops")
                stop.set()
                return
            try:
                await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
            except asyncio.TimeoutError:
                pass

    watcher = asyncio.create_task(watch_parent())
    pool = await create_pool(settings, max_size=4)
    sender = asyncio.create_task(Dispatcher(pool, settings).run(stop))
    await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    # Bounded cleanup: attempts in flight get GRACE_S to finish (the dispatcher cancels
    # the rest: their leases lapse and another worker sends them again), then the
    # connections go, closed gracefully if they can be, else terminated.
    for step in (sender, watcher):
        try:
            await asyncio.wait_for(step, GRACE_S)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001
            log.warning("webhook dispatcher stopping: %r", exc)
    try:
        await asyncio.wait_for(pool.close(), GRACE_S)
    except (asyncio.TimeoutError, Exception):  # noqa: BLE001
        pool.terminate()


def main() -> None:
    from jobs.worker import use_uvloop

    logging.basicConfig(level=logging.INFO)
    use_uvloop()
    asyncio.get_event_loop().run_until_complete(_main())
    # Everything is in Postgres: nothing left (an executor thread stuck in a DNS lookup, a
    # connection that never closes) may keep an orphaned sender alive.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
