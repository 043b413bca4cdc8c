"""Fixtures of the API tests: a migrated schema, the app with its lifespan, and a small world
(partners, vendors, one key per role) created through the same directory code the admin API
and CLI use. Imported by the tests/test_api_*.py modules; it holds no tests itself."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
import httpx
import pytest

from api.app import create_app
from api.auth import issue_key
from engine import db, directory
from engine.settings import Settings
from tests.conftest import DATABASE_URL, delete_prefix

T0 = "2030-01-01T09:00:00Z"
T0_MS = 1_893_488_400_000


def at(minutes: int) -> str:
    """T0 + minutes as ISO 8601 UTC."""
    from api.validation import format_time

    return format_time(T0_MS + minutes * 60_000)


@dataclass
class World:
    keys: dict[str, str] = field(default_factory=dict)  # name -> plaintext key

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=2_000, ip_rate_burst=4_000,
                            partner_rate_per_minute=600_000, ip_rate_per_minute=1_200_000)


@pytest.fixture
async def migrated(api_settings: Settings):
    await asyncio.to_thread(db.migrate, api_settings)
    yield api_settings
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{api_settings.db_schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def app(migrated: Settings, redis):
    application = create_app(migrated)
    async with application.router.lifespan_context(application):
        await application.state.services.reservations.engine.mark_ready()
        yield application
    await delete_prefix(redis, migrated.key_prefix)


@pytest.fixture
async def client(app):
    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://slotguard.test") as c:
        yield c


async def build_world(pool: asyncpg.Pool) -> World:
    """Partners p1, p2; vendors v-confirm (confirmation), v-instant (instant, free),
    v-paid (payment required), v-other; a key per role and tenant."""
    world = World()
    async with pool.acquire() as conn:
        for partner in ("p1", "p2"):
            await directory.create_partner(conn, partner, partner.upper())
        await directory.create_vendor(conn, "v-confirm", buffer_after_minutes=15)
        await directory.create_vendor(conn, "v-instant", confirmation_required=False)
        await directory.create_vendor(conn, "v-paid", payment_required=True)
        await directory.create_vendor(conn, "v-other")
        await directory.create_resource(conn, "v-confirm-room2", "v-confirm")
        specs = {
            "p1": ("partner", "p1", None), "p2": ("partner", "p2", None),
            "vendor": ("vendor", None, "v-confirm"), "vendor-other": ("vendor", None, "v-other"),
            "vendor-instant": ("vendor", None, "v-instant"),
            "ops": ("ops", None, None), "admin": ("admin", None, None),
            "system": ("system", None, None),
        }
        for name, (role, partner_id, vendor_id) in specs.items():
            issued, _ = await issue_key(conn, role, partner_id=partner_id, vendor_id=vendor_id)
            world.keys[name] = issued.key
    return world


@pytest.fixture
async def world(app) -> World:
    return await build_world(app.state.services.pool)


def create_body(vendor: str = "v-confirm", start: int = 0, minutes: int = 30,
                **extra) -> dict:
    return {"vendorId": vendor, "slotStartTime": at(start), "slotEndTime": at(start + minutes),
            "requesterId": "req-1", **extra}


async def row_counts(pool: asyncpg.Pool) -> dict[str, int]:
    tables = ["partners", "vendors", "resources", "api_keys", "reservations",
              "reservation_history", "bookings", "audit_log", "manual_review"]
    async with pool.acquire() as conn:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
