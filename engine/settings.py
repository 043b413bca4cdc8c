"""Every number that matters, in one object read from the environment.

``REDIS_URL`` and ``DATABASE_URL`` keep their conventional names; everything else is
``SLOTGUARD_<FIELD NAME IN UPPER CASE>``. Durations carry their unit in the name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

LOG_FORMATS = ("plain", "json")
WEBHOOK_DISPATCHERS = ("process", "task", "off")

# Fields whose environment variable is not SLOTGUARD_<NAME>.
_PLAIN_ENV = {"redis_url": "REDIS_URL", "database_url": "DATABASE_URL"}


class SettingsError(ValueError):
    """A setting in the environment cannot be parsed or is out of range."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    # Connections and isolation.
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    key_prefix: str = ""  # prepended to every Redis key (outside the hash tag)
    db_schema: str = "slotguard"  # Postgres schema that holds every table
    shards: int = 16  # hash tags {sg:0} .. {sg:shards-1}; fixed for the life of the data

    # Holds.
    hold_ttl_ms: int = 600_000  # first stage: 10 min from creation
    confirmed_ttl_ms: int = 1_800_000  # +30 min at vendor confirmation
    authorized_ttl_ms: int = 900_000  # +15 min once both authorizations are in
    max_hold_units: int = 672  # units one hold may cover (a week of 15-min units)
    max_hold_total_ms: int = 7_200_000  # a hold never lives longer than this from creation
    max_extensions: int = 5
    record_retention_ms: int = 86_400_000  # terminal reservation records stay readable
    booked_marker_retention_ms: int = 86_400_000  # booked markers outlive the booking end

    # Abuse controls (0 means unlimited).
    partner_max_live_holds: int = 1_000
    partner_rate_per_minute: int = 6_000
    partner_rate_burst: int = 200
    ip_rate_per_minute: int = 12_000
    ip_rate_burst: int = 400
    idempotency_ttl_ms: int = 86_400_000
    idempotency_lock_ms: int = 30_000  # how long an in-progress request blocks its key

    # Redis access layer.
    redis_batch_max: int = 32
    redis_max_inflight_batches: int = 2
    allow_eviction_policy: bool = False  # refuse to start unless maxmemory-policy=noeviction

    # Commit queue and workers.
    drain_batch_size: int = 500
    drain_block_ms: int = 200
    reclaim_idle_ms: int = 30_000
    max_deliveries: int = 5
    # the reaper wakes at each next deadline, and looks at every shard at least this often
    reaper_interval_ms: int = 1_000
    reconcile_interval_s: int = 300
    # A batch that fails because Postgres or Redis is unreachable is retried in memory
    # (no redelivery spent) after a capped exponential backoff with jitter.
    drain_retry_base_ms: int = 100
    drain_retry_max_ms: int = 5_000

    # API.
    max_body_bytes: int = 16_384
    api_key_cache_ms: int = 5_000
    max_query_range_ms: int = 31 * 86_400_000

    # Resilience and edge hardening (issue 11).
    redis_watch_interval_ms: int = 250  # each process checks Redis (run id, scripts) this often
    redis_reconnect_backoff_max_ms: int = 1_000  # reconnect backoff of the script connection
    eviction_check_interval_ms: int = 1_000  # maxmemory-policy re-checked at run time
    idempotency_refused_ttl_ms: int = 60_000  # records of refused requests (4xx) live this long
    idempotency_refused_max_per_partner: int = 1_000  # refused records kept per partner
    trusted_proxies: str = ""  # comma-separated IPs/CIDRs whose X-Forwarded-For is honoured
    auth_failure_rate_per_minute: int = 10  # failed authentications per client IP (GCRA)
    auth_failure_burst: int = 20  # failures that pass before 429
    api_key_negative_cache_ms: int = 60_000  # an unknown key's digest is remembered this long
    max_header_bytes: int = 16_384  # request line and headers together
    max_header_count: int = 100
    header_read_timeout_ms: int = 10_000  # from a request's first byte to its last header
    body_read_timeout_ms: int = 10_000  # from the last header to the body's last byte
    keep_alive_timeout_ms: int = 5_000  # an idle keep-alive connection is closed after this
    worker_metrics_host: str = "127.0.0.1"  # address of `slotguard worker --metrics-port`
    metrics_partner_labels: bool = False  # partner ids in metric labels (hashed otherwise)

    # Payments (issue 12).
    stripe_api_key: str = ""  # empty: payment-required vendors are refused (no provider)
    stripe_api_base: str = ""  # empty: Stripe's own https://api.stripe.com
    stripe_webhook_secret: str = ""  # whsec_...: POST /v1/stripe/webhook verifies with it
    stripe_timeout_ms: int = 20_000  # one call to the provider
    # Retryable provider errors (network, 429, 5xx) at capture and compensation: bounded
    # exponential backoff with ±20 % jitter, never on card errors.
    payment_retry_attempts: int = 5
    payment_retry_base_ms: int = 1_000
    payment_retry_max_ms: int = 60_000
    # An authorization is captured within this long of its creation or not at all (Stripe
    # keeps a card authorization 7 days; the margin is one day).
    payment_capture_window_ms: int = 6 * 86_400_000

    # Events out: webhooks and the live stream (issue 14).
    webhook_timeout_ms: int = 5_000  # one delivery attempt, connect to last byte
    # Delays (seconds, decimals allowed) between attempts: 8 delays = 9 attempts (~18 h).
    webhook_retry_schedule_s: str = "5,30,120,600,1800,7200,21600,43200"
    webhook_allow_private: bool = False  # accept private/loopback endpoint URLs (tests)
    webhook_disable_after_s: int = 259_200  # an endpoint failing this long is disabled (3 d)
    webhook_secret_overlap_s: int = 86_400  # a rotated-out secret keeps signing this long
    # settled deliveries and the outbox rows older than this are deleted (0: kept forever)
    webhook_retention_days: int = 30
    webhook_poll_ms: int = 200  # the delivery loop looks for due deliveries this often
    # where the worker runs its webhook dispatcher: 'process' (a child process, so deliveries
    # never take the drain's and the reaper's CPU), 'task' (in the worker's event loop) or
    # 'off' (this worker delivers nothing; another one does)
    webhook_dispatcher: str = "process"
    webhook_process_nice: int = 10  # the dispatcher process's niceness, added to the worker's
    webhook_concurrency: int = 32  # attempts in flight per worker process
    webhook_endpoint_concurrency: int = 16  # of those, at most this many to one endpoint
    events_stream_heartbeat_ms: int = 15_000  # SSE comment line when nothing else was sent
    events_stream_poll_ms: int = 250  # SSE reads new events this often

    # Resource groups, pooled holds, optimizer (issue 16, pool).
    pool_max_members: int = 200  # members one resource group may have
    pool_fit_window_units: int = 8  # best_fit looks this many units each side of a stay
    optimizer_min_gain_percent: int = 10  # `slotguard optimize --apply` moves only above it

    # Hold transfer and waitlist handoff (issue 16).
    transfer_offer_ttl_ms: int = 900_000  # an acceptance token lives this long by default
    transfer_offer_max_ttl_ms: int = 86_400_000  # the longest ttlMs an offer may ask for
    waitlist_max_ttl_ms: int = 7 * 86_400_000  # the longest ttlMs a waitlist entry may ask
    # Replay and parity (issue 17): the worker's parity cron (jobs/parity.py).
    parity_interval_s: int = 300  # 0: no parity cron in the worker
    parity_window_s: int = 3_600  # reservations changed within this window are replayed
    parity_settle_s: int = 60  # ... except those changed more recently (still in flight)

    # Availability engine (issue 13).
    availability_rules_cache_ms: int = 60_000  # cached rules reloaded at this age at the latest
    max_busy_blocks: int = 5_000  # busy blocks per vendor (manual and imported together)
    max_calendar_bytes: int = 2_000_000  # an ICS body larger than this is refused (413)

    # CLI, lists and ops hygiene (issue 17).
    # When set, /metrics (API and `slotguard worker --metrics-port`) needs
    # `Authorization: Bearer <token>`.
    metrics_token: str = dataclasses.field(default="", repr=False)
    metrics_partner_series: int = 50  # partners with their own reputation series (rest: _other)
    log_format: str = "plain"  # plain | json: one format for the API, the worker and `up`

    # Redis Cluster (issue 15).
    redis_cluster: bool = False  # REDIS_URL is a seed node of a Redis Cluster (no db number)
    arq_redis_url: str = ""  # a small non-cluster Redis for arq's cron queue (cluster mode)
    redis_wait_replicas: int = 1  # cluster mode: WAIT for this many replicas after a batch
    redis_wait_timeout_ms: int = 100  # ... for at most this long (then a second without)
    redis_cluster_retry_ms: int = 2_000  # TRYAGAIN/CLUSTERDOWN/LOADING re-sent this long

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = env_name(field.name)
            if name in env:
                values[field.name] = _parse(field, env[name])
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and value < 0:
                raise SettingsError(f"{env_name(field.name)} must be >= 0, got {value}")
        for name in ("shards", "hold_ttl_ms", "max_hold_units", "redis_batch_max",
                     "redis_max_inflight_batches", "drain_batch_size",
                     "payment_retry_attempts"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_name(name)} must be >= 1")
        if not self.db_schema.replace("_", "").isalnum():
            raise SettingsError("SLOTGUARD_DB_SCHEMA must be letters, digits and underscores")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"SLOTGUARD_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, "
                                f"got {self.log_format!r}")
        if self.redis_cluster:
            from urllib.parse import urlparse

            db = urlparse(self.redis_url).path.strip("/")
            if db not in ("", "0"):
                raise SettingsError(
                    f"REDIS_URL names database {db}, but a Redis Cluster has only database 0:"
                    " with SLOTGUARD_REDIS_CLUSTER=true, REDIS_URL is a seed node "
                    "(redis://host:port)")
        if self.webhook_dispatcher not in WEBHOOK_DISPATCHERS:
            raise SettingsError("SLOTGUARD_WEBHOOK_DISPATCHER must be one of "
                                f"{', '.join(WEBHOOK_DISPATCHERS)}, got "
                                f"{self.webhook_dispatcher!r}")
        try:
            webhook_retry_schedule(self.webhook_retry_schedule_s)
        except ValueError as exc:
            raise SettingsError(f"SLOTGUARD_WEBHOOK_RETRY_SCHEDULE_S: {exc}") from None
        if min(self.webhook_timeout_ms, self.webhook_concurrency,
               self.webhook_endpoint_concurrency) < 1:
            raise SettingsError("SLOTGUARD_WEBHOOK_TIMEOUT_MS, SLOTGUARD_WEBHOOK_CONCURRENCY "
                                "and SLOTGUARD_WEBHOOK_ENDPOINT_CONCURRENCY must be >= 1")
        try:
            trusted_networks(self.trusted_proxies)
        except ValueError as exc:
            raise SettingsError(f"SLOTGUARD_TRUSTED_PROXIES: {exc}") from None


def trusted_networks(spec: str) -> tuple:
    """``SLOTGUARD_TRUSTED_PROXIES`` parsed: IPs and CIDRs, comma-separated (empty: none)."""
    import ipaddress

    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in spec.split(",") if part.strip())


def webhook_retry_schedule(spec: str) -> tuple[float, ...]:
    """``SLOTGUARD_WEBHOOK_RETRY_SCHEDULE_S`` parsed: the delays (s) between attempts."""
    delays = tuple(float(part) for part in spec.split(",") if part.strip())
    if not delays or any(not 0 <= d <= 7 * 86_400 for d in delays):
        raise ValueError(f"need comma-separated delays of 0..604800 s, got {spec!r}")
    return delays


def env_name(field_name: str) -> str:
    return _PLAIN_ENV.get(field_name, "SLOTGUARD_" + field_name.upper())


def env_names() -> list[str]:
    """Every environment variable the settings object reads (used by the compose check)."""
    return [env_name(f.name) for f in dataclasses.fields(Settings)]


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    name = env_name(field.name)
    if field.type == "bool":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name} must be a boolean, got {raw!r}")
    if field.type == "int":
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    return raw
