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
    from slotguard.logs import configure

    configure(settings.log_format)  # the API's format (issue 17)
    # arq logs every cron run (the reaper runs every second) at INFO: keep its warnings only.
    logging.getLogger("arq.worker").setLevel(logging.WARNING)
    logging.getLogger("slotguard.worker").info("worker starting (pid %s)", os.getpid())
    if args.metrics_port:
        # Loopback by default; SLOTGUARD_METRICS_TOKEN asks for a bearer token (issue 17).
        serve_metrics(args.metrics_port, args.metrics_host or settings.worker_metrics_host,
                      metrics.exposition_registry(), settings.metrics_token)
    run(settings, WorkerMetrics(partner_labels=settings.metrics_partner_labels,
                                partner_series=settings.metrics_partner_series))
    return 0


def serve_metrics(port: int, host: str, registry, token: str):
    """The worker's ``/metrics`` in a daemon thread; with ``token``, only for
    ``Authorization: Bearer <token>`` (else 401)."""
    import threading
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app

    from engine.metrics_auth import authorized

    exposition = make_wsgi_app(registry)

    def app(environ, start_response):
        if not authorized(environ.get("HTTP_AUTHORIZATION"), token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b"a bearer token is required (SLOTGUARD_METRICS_TOKEN)\n"]
        return exposition(environ, start_response)

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
