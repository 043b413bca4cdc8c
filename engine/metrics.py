"""Every Prometheus metric slotguard exposes, and the ``/metrics`` exposition.

One module defines them all so that dashboards, alert rules and tests have one list to check
against (``tests/test_metrics_rules.py`` does). Counters are declared without ``_total``;
prometheus-client appends it on exposition, so ``HOLDS_PLACED`` is scraped as
``slotguard_holds_placed_total``.

Labels are closed, small sets; each is documented where the metric is defined. Never put an
id (reservation, hold, resource, API key, IP address) in a label. The one open-ended label,
``partner``, is set only by :func:`publish_partner_reputation`, which keeps the busiest
``MAX_PARTNER_SERIES`` partners and folds the rest into ``partner="_other"``.

Several processes (uvicorn ``--workers N``, several arq workers): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory in the environment *before* any
process starts (prometheus-client reads it at import), wipe it when the supervisor starts
(:func:`reset_multiprocess_dir`), and serve :func:`render` from any process: it aggregates
every process's files. Counters and histograms sum over processes, live and dead; the
commit-queue and reputation gauges report the largest value among live processes
(``livemax``), so a dead worker's stale reading vanishes once :func:`mark_process_dead` (or
:func:`reap_dead_processes`, for supervisors without a child-exit hook, like uvicorn's) runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Closed label value sets (pre-initialised to zero so that rates and alerts see a series
# before the first event).
LIMIT_SCOPES = ("partner", "ip")
AUTH_FAILURE_REASONS = ("missing", "malformed", "unknown_key", "revoked", "forbidden")
RECONCILE_KINDS = (  # jobs/reconcile.py documents each
    "booked_marker_missing",  # a booking not yet ended lacks its markers in Redis
    "hold_on_booked_unit",  # a live hold sat on a booked unit
    "marker_without_booking",  # a booked marker with no booking row behind it
    "unit_of_missing_hold",  # a unit owned by a hold that no longer exists
    "unit_of_missing_reservation",  # a unit owned by a reservation that no longer exists
    "terminal_reservation_holds_unit",  # a cancelled/expired/failed reservation owns a unit
    "committed_without_marker",  # a COMMITTED reservation's unit is not a booked marker
    "committed_without_booking",  # COMMITTED in Redis, no booking in Postgres
    "stuck_commit",  # COMMIT_IN_PROGRESS past its deadline
    "booking_of_unknown_resource",  # a booking names a resource the catalog lacks
)
PARTNER_OUTCOMES = ("placed", "committed")
MAX_PARTNER_SERIES = 50
OTHER_PARTNER = "_other"

# Buckets, in seconds unless named otherwise.
LUA_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                       0.1, 0.25, 1.0)
HTTP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0)
DRAIN_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                         5.0, 10.0, 30.0)
DRAIN_BATCH_ENTRIES_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)

REGISTRY = CollectorRegistry(auto_describe=True)
# Process and platform metrics are only meaningful for one process; multiprocess mode
# cannot aggregate custom collectors, so they appear in single-process exposition only.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Holds (Redis, the hot path).
HOLDS_PLACED = Counter(
    "slotguard_holds_placed", "Holds placed (every unit acquired).", registry=REGISTRY)
HOLDS_CONFLICTED = Counter(
    "slotguard_holds_conflicted",
    "Hold attempts refused because a unit was already held or booked.", registry=REGISTRY)
HOLDS_EXPIRED = Counter(
    "slotguard_holds_expired", "Holds whose TTL ran out (counted by the reaper).",
    registry=REGISTRY)
# Issue 14: from a reservation's deadline to the reaper's script recording its expiry (both
# on Redis' clock): the live counterpart of benchmarks/expiry_latency.py.
EXPIRY_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0)
EXPIRY_LAG_SECONDS = Histogram(
    "slotguard_expiry_lag_seconds",
    "From a reservation's deadline to the reaper recording its expiry (Redis time).",
    buckets=EXPIRY_LAG_BUCKETS, registry=REGISTRY)
HOLDS_RELEASED = Counter(
    "slotguard_holds_released", "Holds released before expiry (cancel, manual or bulk release).",
    registry=REGISTRY)

# Reservation lifecycle. from_state/to_state: the lifecycle's state names (about 20).
TRANSITIONS = Counter(
    "slotguard_reservation_transitions",
    "Reservation state transitions, by from_state and to_state (state names of the lifecycle).",
    ["from_state", "to_state"], registry=REGISTRY)

# Abuse controls. scope: partner | ip.
RATE_LIMIT_REJECTIONS = Counter(
    "slotguard_rate_limit_rejections", "Requests refused by a rate limit, by scope (partner|ip).",
    ["scope"], registry=REGISTRY)
CAP_REJECTIONS = Counter(
    "slotguard_cap_rejections", "Holds refused by a live-hold cap, by scope (partner|ip).",
    ["scope"], registry=REGISTRY)
IDEMPOTENT_REPLAYS = Counter(
    "slotguard_idempotent_replays",
    "Requests answered from a stored Idempotency-Key response instead of being executed again.",
    registry=REGISTRY)

# Redis access layer. script: the Lua script's file name without .lua (one per command).
LUA_CALL_SECONDS = Histogram(
    "slotguard_lua_call_seconds",
    "Latency of one Lua script call as its caller sees it (batching included), by script.",
    ["script"], buckets=LUA_SECONDS_BUCKETS, registry=REGISTRY)

# HTTP. route: the route's path template (/v1/reservations/{reservationId}), "unmatched" for
# 404s outside every route; method: the HTTP method; status: the response code ("201").
HTTP_REQUEST_SECONDS = Histogram(
    "slotguard_http_request_seconds",
    "HTTP request latency, by route template, method and status code.",
    ["route", "method", "status"], buckets=HTTP_SECONDS_BUCKETS, registry=REGISTRY)

# Commit queue (one Redis stream per shard). shard: 0 .. SLOTGUARD_SHARDS-1.
COMMIT_QUEUE_LENGTH = Gauge(
    "slotguard_commit_queue_length", "Entries in the shard's commit-queue stream.",
    ["shard"], multiprocess_mode="livemax", registry=REGISTRY)
COMMIT_QUEUE_PENDING = Gauge(
    "slotguard_commit_queue_pending",
    "Entries delivered to a worker but not yet acknowledged, per shard.",
    ["shard"], multiprocess_mode="livemax", registry=REGISTRY)
COMMIT_QUEUE_OLDEST_AGE_SECONDS = Gauge(
    "slotguard_commit_queue_oldest_pending_age_seconds",
    "Age of the oldest entry not yet acknowledged (0 when none), per shard.",
    ["shard"], multiprocess_mode="livemax", registry=REGISTRY)
DRAIN_BATCH_ENTRIES = Histogram(
    "slotguard_drain_batch_entries", "Entries per drained commit-queue batch.",
    buckets=DRAIN_BATCH_ENTRIES_BUCKETS, registry=REGISTRY)
DRAIN_SECONDS = Histogram(
    "slotguard_drain_seconds",
    "Time to drain one batch: Postgres transaction, Lua finalisation and XACK.",
    buckets=DRAIN_SECONDS_BUCKETS, registry=REGISTRY)
DEAD_LETTERS = Counter(
    "slotguard_dead_letters",
    "Commit-queue entries moved aside after SLOTGUARD_MAX_DELIVERIES failed deliveries.",
    registry=REGISTRY)

# Reconciliation (Redis against Postgres). kind: one of RECONCILE_KINDS.
RECONCILE_FINDINGS = Counter(
    "slotguard_reconciliation_findings", "Disagreements found by reconciliation, by kind.",
    ["kind"], registry=REGISTRY)
RECONCILE_FIXES = Counter(
    "slotguard_reconciliation_fixes", "Disagreements reconciliation repaired, by kind.",
    ["kind"], registry=REGISTRY)
RECONCILE_UNFIXED = Counter(
    "slotguard_reconciliation_unfixed",
    "Disagreements reconciliation found but could not (or must not) repair, by kind.",
    ["kind"], registry=REGISTRY)

# Auth. reason: one of AUTH_FAILURE_REASONS.
AUTH_FAILURES = Counter(
    "slotguard_auth_failures", "Requests refused by authentication or authorisation, by reason.",
    ["reason"], registry=REGISTRY)

# Partner reputation over the reputation window. partner: a partner id for the busiest
# MAX_PARTNER_SERIES partners, "_other" for the rest; outcome: placed | committed.
PARTNER_HOLDS = Gauge(
    "slotguard_partner_holds",
    "Holds per partner over the reputation window, by outcome (placed|committed).",
    ["partner", "outcome"], multiprocess_mode="livemax", registry=REGISTRY)

# Events out (issue 14). outcome of a delivery: one of WEBHOOK_DELIVERY_OUTCOMES (final
# fates); of an attempt: one of WEBHOOK_ATTEMPT_OUTCOMES.
WEBHOOK_DELIVERY_OUTCOMES = ("delivered", "failed", "dead")
WEBHOOK_ATTEMPT_OUTCOMES = ("success", "retry", "final")
WEBHOOK_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WEBHOOK_DELIVERIES = Counter(
    "slotguard_webhook_deliveries",
    "Webhook deliveries that reached a final outcome (delivered|failed|dead).",
    ["outcome"], registry=REGISTRY)
WEBHOOK_ATTEMPTS = Counter(
    "slotguard_webhook_attempts",
    "Webhook delivery attempts, by outcome (success|retry|final).",
    ["outcome"], registry=REGISTRY)
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "slotguard_webhook_attempt_seconds",
    "Time of one webhook attempt, request to response (or timeout).",
    buckets=WEBHOOK_SECONDS_BUCKETS, registry=REGISTRY)
WEBHOOK_DEAD_DELIVERIES = Counter(
    "slotguard_webhook_dead_deliveries",
    "Webhook deliveries that went dead after the last attempt of the retry schedule.",
    registry=REGISTRY)
WEBHOOK_ENDPOINTS_DISABLED = Counter(
    "slotguard_webhook_endpoints_disabled",
    "Webhook endpoints disabled for failing longer than SLOTGUARD_WEBHOOK_DISABLE_AFTER_S.",
    registry=REGISTRY)
for _outcome in WEBHOOK_DELIVERY_OUTCOMES:
    WEBHOOK_DELIVERIES.labels(outcome=_outcome)
for _outcome in WEBHOOK_ATTEMPT_OUTCOMES:
    WEBHOOK_ATTEMPTS.labels(outcome=_outcome)
# Replay and parity (issue 17): events of the last parity run (the worker's cron, or
# `slotguard parity`) that disagree with the audit log, by status (engine/parity.py).
PARITY_STATUSES = ("diff", "missing", "extra")
PARITY_DRIFT_EVENTS = Gauge(
    "slotguard_parity_drift_events",
    "Replay events of the last parity run that disagree with the audit log, by status "
    "(diff|missing|extra).",
    ["status"], multiprocess_mode="livemax", registry=REGISTRY)
# Not pre-initialised: a livemax child writes a file per process at creation, and every
# process importing this module (the CLI too) would leave one behind.

for _scope in LIMIT_SCOPES:
    RATE_LIMIT_REJECTIONS.labels(scope=_scope)
    CAP_REJECTIONS.labels(scope=_scope)
for _reason in AUTH_FAILURE_REASONS:
    AUTH_FAILURES.labels(reason=_reason)
for _kind in RECONCILE_KINDS:
    RECONCILE_FINDINGS.labels(kind=_kind)
    RECONCILE_FIXES.labels(kind=_kind)
    RECONCILE_UNFIXED.labels(kind=_kind)

_published_partners: set[str] = set()


def publish_partner_reputation(counts: Mapping[str, tuple[int, int]],
                               limit: int = MAX_PARTNER_SERIES) -> None:
    """Set ``slotguard_partner_holds`` from ``{partner: (placed, committed)}``.

    The ``limit`` partners with the most placed holds get their own series; the others are
    summed into ``partner="_other"``. A partner that drops out is set to 0 (series cannot be
    removed in multiprocess mode).
    """
    ranked = sorted(counts.items(), key=lambda item: (-item[1][0], item[0]))
    shown = dict(ranked[:limit])
    rest = ranked[limit:]
    shown[OTHER_PARTNER] = (sum(p for _, (p, _c) in rest), sum(c for _, (_p, c) in rest))
    for partner in _published_partners - shown.keys():
        shown[partner] = (0, 0)
    for partner, (placed, committed) in shown.items():
        PARTNER_HOLDS.labels(partner=partner, outcome="placed").set(placed)
        PARTNER_HOLDS.labels(partner=partner, outcome="committed").set(committed)
    _published_partners.update(shown)


# Exposition.
def multiprocess_dir() -> Path | None:
    raw = os.environ.get(MULTIPROC_ENV)
    return Path(raw) if raw else None


def multiprocess_mode() -> bool:
    """Whether this process writes its metrics to ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus-client decides once, when it is imported; the environment must agree.
    """
    writing_files = values.ValueClass is not values.MutexValue
    if writing_files != (multiprocess_dir() is not None):
        raise RuntimeError(
            f"{MULTIPROC_ENV} changed after prometheus_client was imported: set it in the "
            "environment before the process starts")
    return writing_files


def exposition_registry() -> CollectorRegistry:
    """The registry to serve on ``/metrics``: every process's metrics, or just this one's."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir()))
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The ``/metrics`` body and its content type."""
    return generate_latest(exposition_registry()), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Forget a dead process's live gauges (a no-op outside multiprocess mode)."""
    directory = multiprocess_dir()
    if directory is not None:
        multiprocess.mark_process_dead(pid, str(directory))


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def reap_dead_processes() -> list[int]:
    """Mark dead every process that left live-gauge files but no longer runs.

    For supervisors that offer no child-exit hook (uvicorn): call it at worker start-up or
    before each scrape. Answers the pids it marked. (Counter and histogram files of dead
    processes stay: their counts are part of the totals.)
    """
    directory = multiprocess_dir()
    if directory is None or not directory.is_dir():
        return []
    pids = {int(m.group(1)) for f in directory.iterdir()
            if (m := _LIVE_GAUGE_FILE.match(f.name))}
    dead = [pid for pid in sorted(pids) if not _running(pid)]
    for pid in dead:
        mark_process_dead(pid)
    return dead


def reset_multiprocess_dir(directory: Path | str | None = None) -> None:
    """Empty the metrics directory; the supervisor calls it once, before starting processes."""
    path = Path(directory) if directory is not None else multiprocess_dir()
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    for f in path.glob("*.db"):
        f.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
