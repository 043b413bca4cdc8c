"""``slotguard worker [--metrics-port N]``: the arq worker (commit queue, reaper,
reconciliation, rehydration), with Prometheus metrics served on their own port."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker", help="run a worker: commit-queue drain, reaper, reconciliation")
    worker.add_argument("--metrics-port", type=int,
                        default=int(os.environ.get("SLOTGUARD_WORKER_METRICS_PORT", 0)) or None,
                        help="serve /metrics on this port (default: none)")
    worker.add_argument("--metrics-host", default=None,
                        help="address of the metrics server (default: "
                             "SLOTGUARD_WORKER_METRICS_HOST, 127.0.0.1)")
    worker.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from engine import metrics
    from engine.runtime import preflight_or_message
    from engine.settings import Settings
    from jobs.metrics import WorkerMetrics
    from jobs.worker import run

    from engine.errors import UnsafeRedis
    from jobs.worker import arq_redis_url

    settings = Settings.from_env()
    try:
        arq_redis_url(settings)
    except UnsafeRedis as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    refusal = preflight_or_message(settings)  # an evicting Redis, another shard count
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO,
                        format='{"at":"%(asctime)s","level":"%(levelname)s",'
                               '"logger":"%(name)s","message":"%(message)s"}')
    # arq logs every cron run (the reaper runs every second) at INFO: keep its warnings only.
    logging.getLogger("arq.worker").setLevel(logging.WARNING)
    logging.getLogger("slotguard.worker").info("worker starting (pid %s)", os.getpid())
    if args.metrics_port:
        # Loopback by default: the exposition has no authentication.
        start_http_server(args.metrics_port,
                          addr=args.metrics_host or settings.worker_metrics_host,
                          registry=metrics.exposition_registry())
    run(settings, WorkerMetrics(partner_labels=settings.metrics_partner_labels))
    return 0
