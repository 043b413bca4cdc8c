"""Where a run happens, and what it prepares there (and removes afterwards).

Servers: ``REDIS_URL`` / ``DATABASE_URL`` when set; else the machine's standard local ports
when something answers there; else real servers started with
:class:`slotguard.embedded.EmbeddedServers` in a temporary directory (stopped at the end).

Everything a run writes lives under its own Redis key prefix (``bench<hex>:``) and its own
Postgres schema (``SLOTGUARD_DB_SCHEMA`` when ``--schema`` names it, else a fresh
``bench_<hex>``); both are removed at the end unless ``--keep`` is given. The schema gets the
real migrations (engine.db.migrate), the baseline tables, a partner, vendors and API keys.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as aioredis

from benchmarks.load import ResourceSpec
from engine import directory
from engine.db import create_pool, migrate
from engine.keys import KeySpace
from engine.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, Settings

PARTNER = "bench-partner"
MINUTE_MS = 60_000

# The baseline tables of the Postgres-only path: the same interval rule as ``bookings``
# (half-open, buffered block), one with the exclusion constraint and one without (guarded by
# SELECT ... FOR UPDATE on the resource row instead).
BASELINE_DDL = """
CREATE TABLE IF NOT EXISTS bench_resources (id text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS bench_pg_excl (
    id text PRIMARY KEY, resource_id text NOT NULL, resource_key bigint NOT NULL,
    block_start timestamptz NOT NULL, block_end timestamptz NOT NULL,
    cancelled_at timestamptz,
    CONSTRAINT bench_pg_excl_no_overlap EXCLUDE USING gist (
        int8range(resource_key, resource_key, '[]') WITH &&,
        tstzrange(block_start, block_end, '[)') WITH &&) WHERE (cancelled_at IS NULL)
);
CREATE TABLE IF NOT EXISTS bench_pg_lock (
    id text PRIMARY KEY, resource_id text NOT NULL, resource_key bigint NOT NULL,
    block_start timestamptz NOT NULL, block_end timestamptz NOT NULL,
    cancelled_at timestamptz
);
CREATE INDEX IF NOT EXISTS bench_pg_lock_live ON bench_pg_lock (resource_id, block_start)
    WHERE cancelled_at IS NULL;
"""
BASELINE_TABLES = ("bench_pg_excl", "bench_pg_lock")


def api_available() -> bool:
    return importlib.util.find_spec("api.app") is not None


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1",
                                       parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


class BenchEnv:
    def __init__(self, settings: Settings, *, embedded=None, embedded_dir: Path | None = None,
                 drop_schema: bool = True, log_dir: Path) -> None:
        self.settings = settings
        self.keys = KeySpace(settings.key_prefix, settings.shards)
        self.embedded = embedded
        self.embedded_dir = embedded_dir
        self.drop_schema = drop_schema
        self.log_dir = log_dir
        self.redis: aioredis.Redis | None = None
        self.pool: asyncpg.Pool | None = None
        self.partner_key: str | None = None
        self.vendor_keys: dict[str, str] = {}
        self.server_source = "environment"

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def start(cls, *, schema: str | None = None, shards: int = 16,
              keep: bool = False) -> BenchEnv:
        """Find (or start) the servers and build the run's settings; blocking."""
        redis_url = os.environ.get("REDIS_URL")
        database_url = os.environ.get("DATABASE_URL")
        embedded = embedded_dir = None
        source = "environment"
        if redis_url is None and database_url is None:
            if _answers(DEFAULT_REDIS_URL, 6379) and _answers(DEFAULT_DATABASE_URL, 5432):
                redis_url, database_url, source = DEFAULT_REDIS_URL, DEFAULT_DATABASE_URL, \
                    "local standard ports"
            else:
                from slotguard.embedded import EmbeddedServers

                embedded_dir = Path(tempfile.mkdtemp(prefix="slotguard-bench-"))
                embedded = EmbeddedServers(embedded_dir / "data")
                redis_url, database_url = embedded.start()
                source = "embedded (slotguard.embedded, temporary directory)"
        redis_url = redis_url or DEFAULT_REDIS_URL
        database_url = database_url or DEFAULT_DATABASE_URL
        run = uuid.uuid4().hex[:8]
        own_schema = schema is None
        settings = Settings.from_env(
            redis_url=redis_url, database_url=database_url, key_prefix=f"bench{run}:",
            db_schema=schema or f"bench_{run}", shards=shards,
            # Abuse controls stay on (their scripts run on every request, as in production)
            # but far above what a benchmark sends.
            partner_rate_per_minute=1_000_000_000, partner_rate_burst=100_000_000,
            ip_rate_per_minute=1_000_000_000, ip_rate_burst=100_000_000,
            partner_max_live_holds=100_000_000)
        log_dir = Path(tempfile.mkdtemp(prefix="slotguard-bench-logs-"))
        env = cls(settings, embedded=embedded, embedded_dir=embedded_dir,
                  drop_schema=own_schema and not keep, log_dir=log_dir)
        env.keep = keep
        env.server_source = source
        return env

    @property
    def pg_endpoint_table(self) -> str:
        from benchmarks.baseline_app import pg_endpoint_table

        return pg_endpoint_table(self.settings)

    async def prepare(self) -> None:
        from benchmarks.baseline_app import PG_ENDPOINT_DDL, pg_endpoint_schema

        await asyncio.to_thread(migrate, self.settings)
        from engine.connection import open_redis

        self.redis = open_redis(self.settings, health_check_interval=0)
        self.pool = await create_pool(self.settings, max_size=4)
        async with self.pool.acquire() as conn:
            await conn.execute(BASELINE_DDL)
            # The pg_endpoint baseline's own schema (a user's table, nothing of ours in it).
            await conn.execute(PG_ENDPOINT_DDL.format(schema=pg_endpoint_schema(
                self.settings)))
            await directory.create_partner(conn, PARTNER, "slotguard bench")
            if api_available():
                from api.auth import issue_key

                issued, _ = await issue_key(conn, "partner", partner_id=PARTNER)
                self.partner_key = issued.key

    async def create_vendor(self, vendor_id: str, *, resources: int = 1, unit_minutes: int = 15,
                            buffer_before_minutes: int = 0, buffer_after_minutes: int = 0,
                            confirmation_required: bool = False) -> list[ResourceSpec]:
        """A free vendor and its resources in Postgres (the API and workers load them), plus
        a vendor API key when the API is present."""
        async with self.pool.acquire() as conn:
            await directory.create_vendor(
                conn, vendor_id, unit_minutes=unit_minutes,
                buffer_before_minutes=buffer_before_minutes,
                buffer_after_minutes=buffer_after_minutes,
                confirmation_required=confirmation_required, payment_required=False)
            ids = [vendor_id] + [f"{vendor_id}-{i}" for i in range(1, resources)]
            for rid in ids[1:]:
                await directory.create_resource(conn, rid, vendor_id)
            await conn.executemany("INSERT INTO bench_resources (id) VALUES ($1) "
                                   "ON CONFLICT DO NOTHING", [(r,) for r in ids])
            if api_available():
                from api.auth import issue_key

                issued, _ = await issue_key(conn, "vendor", vendor_id=vendor_id)
                self.vendor_keys[vendor_id] = issued.key
        return [ResourceSpec(rid, unit_minutes * MINUTE_MS, buffer_before_minutes * MINUTE_MS,
                             buffer_after_minutes * MINUTE_MS, vendor_id) for rid in ids]

    async def register_resources(self, resources: list[ResourceSpec]) -> None:
        """Rows the pg_lock baseline locks (engine-only resources need nothing else)."""
        async with self.pool.acquire() as conn:
            await conn.executemany("INSERT INTO bench_resources (id) VALUES ($1) "
                                   "ON CONFLICT DO NOTHING", [(r.id,) for r in resources])

    # ---- cleaning up ---------------------------------------------------------------------
    async def close(self) -> dict[str, int]:
        """Remove every key of the prefix and the schema; answers what was removed."""
        removed = {"keys": 0, "schema_dropped": 0}
        if self.redis is not None:
            if not getattr(self, "keep", False):
                prefix = self.settings.key_prefix
                removed["keys"] = await delete_matching(self.redis, f"{prefix}*")
                # arq's cron bookkeeping (arq:job:cron:<prefix>reap:..., arq:result:...),
                # on arq's own Redis where it has one (SLOTGUARD_ARQ_REDIS_URL, issue 15).
                arq = self.redis
                if self.settings.arq_redis_url:
                    arq = aioredis.Redis.from_url(self.settings.arq_redis_url,
                                                  decode_responses=True)
                try:
                    removed["keys"] += await delete_matching(arq, f"arq:*{prefix}*")
                    if arq is not self.redis:
                        removed["keys"] += await delete_matching(arq, f"{prefix}*")
                finally:
                    if arq is not self.redis:
                        await arq.aclose()
            await self.redis.aclose()
        if self.pool is not None:
            await self.pool.close()
        if self.drop_schema or not getattr(self, "keep", False):
            from benchmarks.baseline_app import pg_endpoint_schema

            conn = await asyncpg.connect(_libpq(self.settings.database_url))
            try:
                if not getattr(self, "keep", False):  # the pg_endpoint schema is always ours
                    await conn.execute(f'DROP SCHEMA IF EXISTS '
                                       f'"{pg_endpoint_schema(self.settings)}" CASCADE')
                    removed["pg_endpoint_schema_dropped"] = 1
                if self.drop_schema:
                    await conn.execute(
                        f'DROP SCHEMA IF EXISTS "{self.settings.db_schema}" CASCADE')
                    removed["schema_dropped"] = 1
            finally:
                await conn.close()
        return removed

    def stop_servers(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            shutil.rmtree(self.embedded_dir, ignore_errors=True)
        if not getattr(self, "keep", False):
            shutil.rmtree(self.log_dir, ignore_errors=True)


async def delete_matching(client: aioredis.Redis, pattern: str) -> int:
    removed, batch = 0, []
    async for key in client.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += await client.unlink(*batch)
            batch.clear()
    if batch:
        removed += await client.unlink(*batch)
    return removed


def _libpq(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return "postgresql://" + rest
