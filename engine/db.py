"""Postgres: the schema migrations and the asyncpg pool every process shares.

Every table lives in ``settings.db_schema`` (one schema per deployment, and per test), and so
do yoyo's own bookkeeping tables: yoyo sets ``search_path`` from the ``schema`` URL argument
on its connection. Migrations are plain SQL files shipped inside the package
(``engine/migrations``), read through ``importlib.resources``.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import orjson
import psycopg
from yoyo import get_backend, read_migrations

from engine.settings import Settings

MIGRATIONS = "package:engine:migrations"
# yoyo's default table names, kept; they live in the schema beside ours.
MIGRATION_TABLE = "_yoyo_migration"


def quoted_schema(settings: Settings) -> str:
    """The schema as a quoted identifier (Settings allows only letters, digits and ``_``)."""
    return f'"{settings.db_schema}"'


def migrate(settings: Settings) -> list[str]:
    """Create the schema if missing and apply every pending migration into it.

    Returns the ids of the migrations this call applied (empty when already up to date).
    Idempotent, and safe when several processes start at once: a session advisory lock per
    schema serialises them (yoyo's own lock table cannot, since two processes could race to
    create it), so the loser finds nothing left to apply. Blocking: from async code run it
    with ``asyncio.to_thread``.
    """
    with psycopg.connect(_libpq_url(settings.database_url), autocommit=True) as guard:
        guard.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                      (f"slotguard.migrate:{settings.db_schema}",))
        try:
            guard.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted_schema(settings)}")
            backend = get_backend(yoyo_url(settings), migration_table=MIGRATION_TABLE)
            try:
                migrations = read_migrations(MIGRATIONS)
                with backend.lock():
                    pending = backend.to_apply(migrations)
                    backend.apply_migrations(pending)
                return [m.id for m in pending]
            finally:
                backend.connection.close()
        finally:
            guard.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                          (f"slotguard.migrate:{settings.db_schema}",))


def yoyo_url(settings: Settings) -> str:
    """The database URL in yoyo's psycopg-3 form, with the schema as its search path."""
    parts = urlsplit(_libpq_url(settings.database_url))
    query = "&".join(p for p in (parts.query, "schema=" + quote(quoted_schema(settings))) if p)
    return urlunsplit(("postgresql+psycopg", parts.netloc, parts.path, query, ""))


def _libpq_url(url: str) -> str:
    """``postgres://`` and ``postgresql+driver://`` spellings to plain ``postgresql://``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return "postgresql://" + rest


async def init_connection(conn: asyncpg.Connection) -> None:
    """json/jsonb as Python objects through orjson (the store functions do not rely on it)."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, schema="pg_catalog", encoder=_dump_json,
                                  decoder=orjson.loads, format="text")


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10,
                      **kwargs: Any) -> asyncpg.Pool:
    """A pool whose connections resolve every table in ``settings.db_schema``."""
    return await asyncpg.create_pool(
        _libpq_url(settings.database_url),
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": quoted_schema(settings)},
        init=init_connection,
        **kwargs,
    )


def columns(record_type: type) -> str:
    """The select list for a row dataclass: explicit, so adding a column breaks no reader."""
    return ", ".join(f.name for f in dataclasses.fields(record_type)
                     if f.metadata.get("column", True))


def _dump_json(value: Any) -> str:
    return orjson.dumps(value).decode()


def json_param(value: Any) -> str:
    """JSON text for a ``$n::text::jsonb`` parameter: works with or without the codec."""
    return orjson.dumps(value).decode()


def json_value(value: Any) -> Any:
    """A json/jsonb column as a Python object, whether or not the codec is installed."""
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value
