"""Postgres schema against a real server: migrations, the constraints that guard invariants
1 and 3, and the directory CRUD (typed errors, nothing written on bad input)."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from engine import directory
from engine.db import create_pool, migrate, yoyo_url
from engine.directory import AlreadyExists, UnknownPartner, UnknownVendor
from engine.errors import NotFound, UnknownResource, ValidationError
from engine.settings import Settings
from tests.conftest import DATABASE_URL

ALL_MIGRATIONS = ["0001_directory", "0002_reservations", "0003_bookings", "0004_audit_log",
                  "0005_manual_review", "0006_reservation_blocks",
                  "0007_availability",  # issue 13
                  "0008_payments",  # issue 12
                  "0009_webhooks",  # issue 14
                  "0010_fencing",  # issue 15
                  "0011_resource_shard_keys_and_groups",  # issue 16 (pool)
                  "0012_list_indexes",  # issue 17
                  "0014_reservation_items",  # issue 16 (pool2)
                  "0015_webhook_retention",  # issue 14 (events)
                  "0016_webhook_notify",  # issue 14 (delivery)
                  ]
OUR_TABLES = {"partners", "vendors", "resources", "api_keys", "reservations",
              "reservation_history", "bookings", "audit_log", "manual_review", "dead_letters",
              "resource_groups", "resource_group_members"}
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
H = timedelta(hours=1)
DIGEST = "0" * 64


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def db(settings: Settings):
    """A pool on a freshly migrated schema of this test's own, dropped afterwards."""
    await asyncio.to_thread(migrate, settings)
    pool = await create_pool(settings, max_size=4)
    yield pool
    await pool.close()
    await drop_schema(settings.db_schema)


@pytest.fixture
async def conn(db: asyncpg.Pool):
    async with db.acquire() as connection:
        yield connection


async def tables_in(schema: str) -> set[str]:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
        return {r[0] for r in rows}
    finally:
        await conn.close()


# ---- migrations -------------------------------------------------------------------------
async def test_migrate_creates_schema_then_second_run_is_a_no_op(settings):
    try:
        assert await asyncio.to_thread(migrate, settings) == ALL_MIGRATIONS
        tables = await tables_in(settings.db_schema)
        assert OUR_TABLES <= tables
        assert {"_yoyo_migration", "yoyo_lock"} <= tables  # yoyo's bookkeeping is ours too
        assert await asyncio.to_thread(migrate, settings) == []
        public = await tables_in("public")
        assert not OUR_TABLES & public and "_yoyo_migration" not in public
    finally:
        await drop_schema(settings.db_schema)


def _migrate_in_process(settings: Settings) -> list[str]:
    return migrate(settings)


async def test_concurrent_migrates_apply_each_migration_exactly_once(settings):
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=4, mp_context=context) as pool:
            loop = asyncio.get_running_loop()
            runs = await asyncio.gather(*[
                loop.run_in_executor(pool, _migrate_in_process, settings) for _ in range(6)])
        applied = [m for run in runs for m in run]
        assert sorted(applied) == ALL_MIGRATIONS  # all of them, none twice
        assert OUR_TABLES <= await tables_in(settings.db_schema)
    finally:
        await drop_schema(settings.db_schema)


def test_yoyo_url_is_psycopg_with_quoted_schema():
    settings = Settings.from_env({}, database_url="postgres://u:pw@db:5433/app?sslmode=disable",
                                 db_schema="Sg_1")
    assert yoyo_url(settings) == (
        "postgresql+psycopg://u:pw@db:5433/app?sslmode=disable&schema=%22Sg_1%22")
    with pytest.raises(ValueError):
        yoyo_url(settings.replace(database_url="mysql://db/app"))


# ---- bookings exclusion constraint ------------------------------------------------------
async def insert_booking(conn, reservation_id: str, resource_id: str, start: datetime,
                         end: datetime, *, before=timedelta(0), after=timedelta(0)) -> None:
    await conn.execute(
        """INSERT INTO bookings (id, reservation_id, resource_key, resource_id, vendor_id,
               partner_id, requester_id, slot_start, slot_end, block_start, block_end)
           SELECT 'bkg_' || $1, $1, key, id, vendor_id, 'p1', 'u1', $3, $4, $5, $6
           FROM resources WHERE id = $2""",
        reservation_id, resource_id, start, end, start - before, end + after)


async def test_exclusion_constraint_refuses_overlap_on_one_resource_only(conn):
    await directory.create_vendor(conn, "v1")
    await directory.create_resource(conn, "room-2", "v1")
    await insert_booking(conn, "r1", "v1", T0, T0 + H)
    with pytest.raises(asyncpg.ExclusionViolationError):
        await insert_booking(conn, "r2", "v1", T0 + H / 2, T0 + 2 * H)
    with pytest.raises(asyncpg.ExclusionViolationError):  # contained
        await insert_booking(conn, "r2", "v1", T0 + H / 4, T0 + H / 2)
    await insert_booking(conn, "r3", "v1", T0 + H, T0 + 2 * H)  # touching after
    await insert_booking(conn, "r4", "v1", T0 - H, T0)  # touching before
    await insert_booking(conn, "r5", "room-2", T0, T0 + H)  # same time, other resource
    assert await conn.fetchval("SELECT count(*) FROM bookings") == 4


async def test_exclusion_constraint_counts_buffers_and_ignores_cancelled(conn):
    await directory.create_vendor(conn, "v1")
    await insert_booking(conn, "r1", "v1", T0, T0 + H, after=H / 4)
    # The slots touch, but the first booking's post-buffer covers the second's start.
    with pytest.raises(asyncpg.ExclusionViolationError):
        await insert_booking(conn, "r2", "v1", T0 + H, T0 + 2 * H)
    with pytest.raises(asyncpg.ExclusionViolationError):
        await insert_booking(conn, "r2", "v1", T0 - H, T0, after=H / 4)
    await insert_booking(conn, "r2", "v1", T0 + H + H / 4, T0 + 2 * H)
    await conn.execute("UPDATE bookings SET cancelled_at = now() WHERE reservation_id = 'r1'")
    await insert_booking(conn, "r3", "v1", T0, T0 + H)  # a cancelled booking frees its interval


# ---- audit_log is append-only -------------------------------------------------------------
async def test_audit_log_refuses_update_delete_truncate_even_for_superuser_owner(conn):
    assert await conn.fetchval("SELECT current_setting('is_superuser')") == "on"
    assert await conn.fetchval(
        "SELECT tableowner = current_user FROM pg_tables WHERE tablename = 'audit_log' "
        "AND schemaname = current_schema()")
    await conn.execute(
        """INSERT INTO audit_log (event_id, tenant_id, reservation_id, resource_id, action,
               actor, at, metadata) VALUES ('e1', 'p1', 'r1', 'v1', 'reservation.held',
               'system', now(), '{"a": 1}')""")
    for statement in ("UPDATE audit_log SET actor = 'ops'", "DELETE FROM audit_log",
                      "TRUNCATE audit_log", "TRUNCATE audit_log CASCADE"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
    # Replica mode silences ordinary triggers for a superuser; ours are ENABLE ALWAYS.
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM audit_log")
    row = await conn.fetchrow("SELECT actor, metadata FROM audit_log WHERE event_id = 'e1'")
    assert (row["actor"], row["metadata"]) == ("system", {"a": 1})
    with pytest.raises(asyncpg.UniqueViolationError):  # the event id is the idempotency key
        await conn.execute("""INSERT INTO audit_log (event_id, action, actor, at)
                              VALUES ('e1', 'x', 'system', now())""")


# ---- directory CRUD -----------------------------------------------------------------------
async def count(conn, table: str) -> int:
    return await conn.fetchval(f"SELECT count(*) FROM {table}")


async def test_partners(conn):
    partner = await directory.create_partner(conn, "acme", "Acme Travel")
    assert (partner.id, partner.name, partner.active) == ("acme", "Acme Travel", True)
    assert await directory.get_partner(conn, "acme") == partner
    with pytest.raises(AlreadyExists) as info:
        await directory.create_partner(conn, "acme", "Other")
    assert info.value.code == "ALREADY_EXISTS" and info.value.details == {"partnerId": "acme"}
    with pytest.raises(ValidationError):
        await directory.create_partner(conn, "bad id!", "x")
    with pytest.raises(ValidationError):
        await directory.create_partner(conn, "ok", "  ")
    with pytest.raises(UnknownPartner):
        await directory.get_partner(conn, "nobody")
    assert await count(conn, "partners") == 1
    assert (await directory.get_partner(conn, "acme")).name == "Acme Travel"


async def test_vendor_comes_with_its_default_resource(conn):
    vendor = await directory.create_vendor(conn, "salon", unit_minutes=30,
                                           buffer_after_minutes=30, timezone="Europe/Paris",
                                           payment_required=True)
    assert vendor == await directory.get_vendor(conn, "salon")
    resource = await directory.get_resource(conn, vendor.default_resource_id)
    assert (resource.vendor_id, resource.unit_minutes, resource.buffer_before_minutes,
            resource.buffer_after_minutes) == ("salon", 30, 0, 30)
    chair = await directory.create_resource(conn, "salon-chair-2", "salon", unit_minutes=15)
    assert chair.key != resource.key and chair.buffer_after_minutes == 30
    assert [r.id for r in await directory.list_resources(conn, "salon")] == ["salon",
                                                                             "salon-chair-2"]
    catalog = await directory.load_catalog(conn)
    engine_view = catalog.get("salon-chair-2")
    assert (engine_view.unit_ms, engine_view.buffer_after_ms) == (15 * 60_000, 30 * 60_000)


@pytest.mark.parametrize("kwargs", [
    {"unit_minutes": 0}, {"unit_minutes": 7}, {"buffer_before_minutes": -15},
    {"buffer_after_minutes": 10}, {"timezone": "Mars/Olympus"}, {"unit_minutes": "15"},
])
async def test_bad_vendor_settings_write_nothing(conn, kwargs):
    with pytest.raises(ValidationError):
        await directory.create_vendor(conn, "v1", **kwargs)
    assert await count(conn, "vendors") == 0 and await count(conn, "resources") == 0


async def test_duplicate_vendor_or_clashing_default_resource_writes_nothing(conn):
    await directory.create_vendor(conn, "v1")
    await directory.create_resource(conn, "taken", "v1")
    with pytest.raises(AlreadyExists):
        await directory.create_vendor(conn, "v1", unit_minutes=30)
    assert (await directory.get_vendor(conn, "v1")).unit_minutes == 15
    # Vendor "taken" would get resource "taken", which v1 owns: the vendor row rolls back.
    with pytest.raises(AlreadyExists) as info:
        await directory.create_vendor(conn, "taken")
    assert info.value.details == {"resourceId": "taken"}
    with pytest.raises(UnknownVendor):
        await directory.get_vendor(conn, "taken")
    assert await count(conn, "vendors") == 1 and await count(conn, "resources") == 2


async def test_resource_errors_are_typed_and_write_nothing(conn):
    await directory.create_vendor(conn, "v1")
    with pytest.raises(UnknownVendor) as info:
        await directory.create_resource(conn, "room-9", "ghost")
    assert info.value.code == "UNKNOWN_VENDOR" and isinstance(info.value, NotFound)
    with pytest.raises(AlreadyExists):
        await directory.create_resource(conn, "v1", "v1")
    with pytest.raises(ValidationError):
        await directory.create_resource(conn, "room 9", "v1")
    with pytest.raises(ValidationError):
        await directory.create_resource(conn, "room-9", "v1", unit_minutes=60,
                                        buffer_before_minutes=15)
    with pytest.raises(UnknownResource):
        await directory.get_resource(conn, "room-9")
    assert await count(conn, "resources") == 1


async def test_api_keys(conn):
    await directory.create_partner(conn, "acme", "Acme")
    await directory.create_vendor(conn, "v1")
    key = await directory.insert_api_key(conn, key_id="k1", prefix="sg_abc", digest=DIGEST,
                                         role="partner", partner_id="acme")
    assert await directory.find_api_key(conn, "sg_abc") == key and not key.revoked
    assert await directory.find_api_key(conn, "sg_nope") is None
    revoked = await directory.revoke_api_key(conn, "k1")
    assert revoked.revoked and (await directory.revoke_api_key(conn, "k1")) == revoked
    assert (await directory.find_api_key(conn, "sg_abc")).revoked
    with pytest.raises(NotFound):
        await directory.revoke_api_key(conn, "k-ghost")
    await directory.insert_api_key(conn, key_id="k2", prefix="sg_ops", digest=DIGEST, role="ops")

    bad = [
        ({"key_id": "k3", "prefix": "sg_abc", "role": "ops"}, AlreadyExists),
        ({"key_id": "k1", "prefix": "sg_new", "role": "ops"}, AlreadyExists),
        ({"key_id": "k3", "prefix": "sg_new", "role": "root"}, ValidationError),
        ({"key_id": "k3", "prefix": "sg_new", "role": "partner"}, ValidationError),
        ({"key_id": "k3", "prefix": "sg_new", "role": "vendor"}, ValidationError),
        ({"key_id": "k3", "prefix": "sg_new", "role": "ops", "digest": "plaintext"},
         ValidationError),
        ({"key_id": "k3", "prefix": "sg_new", "role": "partner", "partner_id": "ghost"},
         UnknownPartner),
        ({"key_id": "k3", "prefix": "sg_new", "role": "vendor", "vendor_id": "ghost"},
         UnknownVendor),
    ]
    for kwargs, error in bad:
        with pytest.raises(error):
            await directory.insert_api_key(conn, **{"digest": DIGEST, **kwargs})
    assert await count(conn, "api_keys") == 2
    # The database refuses a plaintext-sized digest even if a caller skips this module.
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO api_keys (id, prefix, digest, role) "
                           "VALUES ('k9', 'p9', 'short', 'ops')")
