"""The arq worker: commit-queue drain, expiry reaper, reconciliation, rehydration.

``slotguard worker`` runs :func:`run`. arq owns the process (signals, cron scheduling,
the job queue); at start-up the worker opens a :class:`engine.runtime.Runtime`,
rehydrates booked markers if this Redis needs it, and starts three background tasks: the
commit-queue drain (one blocking reader per shard), the expiry reaper (jobs/reaper.py: it
sleeps until the next deadline and expires each shard's due reservations in one script call,
exactly once even with several workers racing) and the webhook dispatcher. Cron jobs:

- ``queues`` (every second): the commit-queue lengths for the metrics.
- ``reconcile`` (every ``SLOTGUARD_RECONCILE_INTERVAL_S``, default 5 minutes).
- ``webhook_retention`` (hourly): settled deliveries and outbox rows older than
  ``SLOTGUARD_WEBHOOK_RETENTION_DAYS`` are deleted in bounded batches
  (jobs/webhook_retention.py).
- webhook delivery (engine/webhook_delivery.py): by default a child process
  (jobs/webhook_process.py, ``SLOTGUARD_WEBHOOK_DISPATCHER``), else a task beside the drain.
- ``watch_redis`` (every second): a changed Redis run id (a restart) triggers rehydration.
- ``parity`` (every ``SLOTGUARD_PARITY_INTERVAL_S``, default 5 minutes; 0 = off): replays the
  recently changed reservations against their audit rows (jobs/parity.py, issue 17).

Every job is idempotent: arq delivers at least once.

Redis may restart under a running worker. arq's polling loop has no guard of its own (a
``ConnectionError`` from its ``ZRANGEBYSCORE`` ends the worker), so :class:`ResilientWorker`
catches connection errors around each poll iteration and waits with a capped backoff; the
runtime's Redis watch (engine/runtime.py) registers the scripts and rehydrates when Redis is
back, and the commit-queue readers retry by themselves.

The process runs on uvloop when it is installed (it is, with uvicorn[standard]): arq's
Worker takes the current event loop when it is built, so :func:`run` sets a uvloop loop
first. The drain is CPU-bound in Python; uvloop's transports halve the cost of its socket
writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker, get_kwargs
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from engine.errors import UnsafeRedis
from engine.runtime import Runtime
from engine.settings import Settings
from engine.db import create_pool
from engine.webhook_delivery import Dispatcher
from jobs.commit_queue import CommitQueue
from jobs.parity import parity_job
from jobs.reaper import Reaper
from jobs.reconcile import reconcile
from jobs.webhook_process import DispatcherProcess
from jobs.webhook_retention import prune as prune_webhooks
from jobs.reputation import publish_reputation

log = logging.getLogger("slotguard.worker")


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def startup(ctx: dict) -> None:
    settings: Settings = ctx["settings"]
    metrics = ctx.get("metrics")
    rt = await Runtime.open(settings, observe=metrics.observe_script if metrics else None,
                            watch=True)
    ctx["rt"] = rt
    log.info("worker %s on %s", consumer_name(), type(asyncio.get_running_loop()).__module__)
    report = await rt.rehydrate_if_needed()
    if report is not None:
        log.info("rehydrated %s bookings (%s markers)", report.bookings, report.markers_written)
    # Payments (issue 12): captures at commit when a Stripe key is set.
    from engine.payments.orchestrator import PaymentOrchestrator
    from engine.payments.provider import provider_from_settings

    provider = provider_from_settings(settings)
    ctx["payments"] = None if provider is None else PaymentOrchestrator(
        provider, rt.pool, rt.reservations, settings)
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, settings,
                        consumer_name(), metrics, payments=ctx["payments"])
    ctx["queue"] = queue
    ctx["stop"] = asyncio.Event()
    ctx["drain"] = asyncio.create_task(queue.run(ctx["stop"]))
    # The expiry reaper (issue 14): its own task, waking at the next deadline, so an expiry
    # waits neither for a cron tick nor behind arq's job queue.
    ctx["reaper"] = Reaper(rt.reservations, rt.keys.shards, settings.reaper_interval_ms,
                           metrics=metrics)
    ctx["reaping"] = asyncio.create_task(ctx["reaper"].run(ctx["stop"]))
    # Webhook delivery (issue 14): its own Postgres connections, so a slow receiver never
    # holds the drain; by default in a child process (jobs/webhook_process.py), so a backlog
    # of deliveries never takes the CPU the drain and the reaper need.
    ctx["webhook_pool"] = await create_pool(settings, max_size=4)
    mode = settings.webhook_dispatcher
    if mode == "process" and metrics is not None \
            and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("SLOTGUARD_WEBHOOK_DISPATCHER=process needs PROMETHEUS_MULTIPROC_DIR for "
                    "its metrics to reach this worker's /metrics: the dispatcher runs in the "
                    "worker's event loop instead")
        mode = "task"
    if mode == "process":
        ctx["webhooks"] = asyncio.create_task(DispatcherProcess().run(ctx["stop"]))
    elif mode == "task":
        ctx["webhooks"] = asyncio.create_task(
            Dispatcher(ctx["webhook_pool"], settings).run(ctx["stop"]))
    else:
        ctx["webhooks"] = asyncio.create_task(ctx["stop"].wait())


async def shutdown(ctx: dict) -> None:
    if "stop" in ctx:
        ctx["stop"].set()
        await asyncio.gather(ctx["drain"], ctx["reaping"], ctx["webhooks"],
                             return_exceptions=True)
    if "webhook_pool" in ctx:
        await ctx["webhook_pool"].close()
    if ctx.get("payments") is not None:
        await ctx["payments"].provider.close()
    if "rt" in ctx:
        await ctx["rt"].close()


async def observe_queues(ctx: dict) -> None:
    """The commit-queue lengths for the metrics (when the worker serves metrics)."""
    metrics = ctx.get("metrics")
    if metrics is not None:
        await metrics.observe_queues(ctx["queue"])


async def reconcile_job(ctx: dict) -> dict:
    """Compare Redis and Postgres; fix the safe cases, escalate the rest. Idempotent."""
    report = await reconcile(ctx["rt"], ctx.get("metrics"))
    out = report.as_dict()
    if ctx.get("payments") is not None:
        # Payments (issue 12): authorizations whose reservation ended without a commit are
        # cancelled; stale ones (past the capture window) too, their reservation cancelled.
        from engine.payments.orchestrator import reservation_state

        out["payments"] = await ctx["payments"].release_orphans(
            reservation_state(ctx["rt"].reservations, ctx["rt"].pool))
    return out


async def webhook_retention_job(ctx: dict) -> dict:
    """Delete the settled deliveries and outbox rows past the retention. Idempotent."""
    return await prune_webhooks(ctx["webhook_pool"], ctx["settings"])


async def watch_redis(ctx: dict) -> bool:
    """Rehydrate when Redis restarted (its run id changed) or lost a shard's flag."""
    try:
        report = await ctx["rt"].rehydrate_if_needed()
    except UnsafeRedis as exc:  # an evicting Redis: holds stay refused, the watch logs it
        log.warning("not rehydrating: %s", exc.message)
        return False
    if report is not None:
        log.warning("Redis changed (run id %s): rehydrated %s bookings", report.run_id,
                    report.bookings)
    return report is not None


def arq_redis_url(settings: Settings) -> str:
    """Where arq keeps its cron queue: ``SLOTGUARD_ARQ_REDIS_URL``, else ``REDIS_URL``.

    arq writes a job's queue entry, job key and in-progress key in one MULTI; their key
    names are fixed by arq (``arq:job:<id>`` ...), so on a Redis Cluster they fall in
    different slots and the cluster refuses them (CROSSSLOT), and arq's client speaks to
    one node only. arq carries no hot-path work here (the commit queue is the shard
    streams, read by the drain on the cluster); it only schedules the cron jobs (reaper,
    Redis watch, reconciliation, reputation), so in cluster mode it gets a small
    non-cluster Redis of its own, and a worker without one refuses to start."""
    if settings.redis_cluster:
        if not settings.arq_redis_url:
            raise UnsafeRedis(
                "SLOTGUARD_REDIS_CLUSTER=true needs SLOTGUARD_ARQ_REDIS_URL: arq's queue "
                "cannot live on a Redis Cluster (CROSSSLOT); give the worker a small "
                "non-cluster Redis for it")
        return settings.arq_redis_url
    return settings.arq_redis_url or settings.redis_url


def _every(interval_s: float) -> dict:
    """arq cron fields for "every interval" (whole seconds dividing a minute or an hour)."""
    interval = max(1, round(interval_s))
    if interval < 60:
        return {"second": set(range(0, 60, interval))}
    minutes = max(1, interval // 60)
    return {"minute": set(range(0, 60, minutes)), "second": 0}


def worker_settings(settings: Settings, metrics=None) -> type:
    """arq's WorkerSettings: a plain class, built for these settings."""
    prefix = settings.key_prefix

    class WorkerSettings:
        functions = []
        cron_jobs = [
            cron(observe_queues, name=f"{prefix}queues", second=set(range(60))),
            cron(watch_redis, name=f"{prefix}watch_redis", second=set(range(60))),
            cron(reconcile_job, name=f"{prefix}reconcile",
                 **_every(settings.reconcile_interval_s)),
            cron(publish_reputation, name=f"{prefix}reputation", run_at_startup=True,
                 **_every(10)),
            cron(webhook_retention_job, name=f"{prefix}webhook_retention", **_every(3600)),
            # Replay and parity (issue 17): drift counts for SlotguardParityDrift.
            *([cron(parity_job, name=f"{prefix}parity", **_every(settings.parity_interval_s))]
              if settings.parity_interval_s else []),
        ]
        on_startup = startup
        on_shutdown = shutdown
        redis_settings = RedisSettings.from_dsn(arq_redis_url(settings))
        queue_name = f"{prefix}arq:queue"
        health_check_key = f"{prefix}arq:health-check"
        ctx = {"settings": settings, "metrics": metrics}
        poll_delay = 0.2
        keep_result = 60

    return WorkerSettings


# What a restarting or unreachable Redis raises under arq's polling loop: connection errors,
# and whatever a command caught mid-way reports (a WATCH whose connection dropped raises
# WatchError, a Redis still loading its data BusyLoadingError): any Redis error there.
_REDIS_DOWN = (RedisError, RedisConnectionError, ConnectionError, OSError, asyncio.TimeoutError)
POLL_BACKOFF_MAX_S = 1.0


class ResilientWorker(Worker):
    """arq's Worker whose polling loop outlives a Redis restart (see the module docstring)."""

    _redis_down_since: float | None = None

    async def _poll_iteration(self) -> None:
        backoff = 0.05
        while True:
            try:
                await super()._poll_iteration()
            except _REDIS_DOWN as exc:
                loop = asyncio.get_running_loop()
                if self._redis_down_since is None:
                    self._redis_down_since = loop.time()
                    log.warning("Redis unreachable from the worker's poll loop: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(POLL_BACKOFF_MAX_S, backoff * 2)
                continue
            if self._redis_down_since is not None:
                log.warning("worker poll loop reaches Redis again after %.1f s",
                            asyncio.get_running_loop().time() - self._redis_down_since)
                self._redis_down_since = None
            return

    async def close(self) -> None:
        await self._settle_jobs()
        try:
            await super().close()
        except _REDIS_DOWN as exc:  # shutting down while Redis is away: close what we own
            log.warning("Redis unreachable at shutdown: %r", exc)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)


    async def _settle_jobs(self) -> None:
        """arq's ``close`` gathers its job tasks without ``return_exceptions``: a job the
        shutdown cancelled (a reap running when SIGTERM came) re-raises CancelledError
        there, so ``on_shutdown`` was skipped and the process exited 1. Wait for the jobs
        here, whatever they end with, and drop the finished ones (as arq's poll loop does)."""
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for job_id, task in list(self.tasks.items()):
                if task.done():
                    del self.tasks[job_id]


def use_uvloop() -> bool:
    """Make a uvloop event loop this thread's current loop (what arq's Worker picks up).

    False, and the default loop stays, when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())
    return True


def run(settings: Settings, metrics=None) -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM."""
    if not use_uvloop():
        log.info("uvloop is not installed: the worker runs on the default asyncio loop")
    ResilientWorker(**get_kwargs(worker_settings(settings, metrics))).run()
