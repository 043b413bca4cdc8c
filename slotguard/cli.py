"""The ``slotguard`` command: one argparse parser, one module per group of subcommands.

``build_parser()`` answers the whole parser (the compose-file test checks commands against
it). Subcommands live in modules listed in :data:`SUBCOMMAND_MODULES`; each module has
``register(subparsers)`` that adds its parsers and sets ``func`` (``func(args) -> int``).

Registration point: engineers adding ``worker``, ``up`` or ``bench`` add a module with a
``register`` function and append its import path to ``SUBCOMMAND_MODULES`` (a module that
is not there yet is skipped, so the list may name it before it lands).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence

from slotguard import __version__, cli_errors, envfile

# ---- registration point ----------------------------------------------------------------
SUBCOMMAND_MODULES: list[str] = [
    "slotguard.cli",  # serve, migrate, partners, vendors, keys (this module)
    "slotguard.cli_worker",  # worker (jobs/, feat/worker)
    "slotguard.cli_up",  # up (embedded servers + api + worker)
    "slotguard.cli_bench",  # bench (benchmarks/)
    "slotguard.chaos",  # chaos (the fault suite's long forms, issue 11)
    "slotguard.cli_pool",  # rekey, optimize (issue 16, pool)
    "slotguard.cli_replay",  # replay, parity (issue 17)
    "slotguard.cli_availability",  # availability: schedules, busy blocks, calendars (issue 13)
    "slotguard.cli_status",  # status (issue 17)
]

# Commands that talk to Redis/Postgres: they take their servers from the environment, else
# from the `.slotguard/env` that `slotguard up` writes, else the defaults (slotguard/
# envfile.py), and say which on stderr. `up` is not one: it decides its own servers.
SERVER_COMMANDS = {"serve", "worker", "migrate", "partners", "vendors", "keys", "bench",
                   "status", "replay", "parity", "availability"}
# Long-running servers keep stderr for their logs (one line per refusal at start).
QUIET_COMMANDS = {"serve", "worker"}


def build_parser() -> argparse.ArgumentParser:
    parser = cli_errors.Parser(
        prog="slotguard", description="Redis-centric, high-throughput hold engine.",
        epilog="Servers: REDIS_URL / DATABASE_URL when set, else the .slotguard/env that "
               "`slotguard up` writes, else the local standard ports. Failures are one line "
               "on stderr: exit 2 for usage, 1 at run time.")
    parser.add_argument("--version", action="version", version=f"slotguard {__version__}")
    parser.add_argument(cli_errors.DEBUG_FLAG, action="store_true",
                        help="show the traceback of a failure (also after the subcommand)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = sys.modules[__name__] if name == __name__ else importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it imports does not
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli_errors.debug_requested(argv)
    args = build_parser().parse_args(cli_errors.strip_debug(argv))
    prog = " ".join(["slotguard", args.command, *([args.action] if isinstance(
        getattr(args, "action", None), str) else [])])
    servers = None
    if args.command in SERVER_COMMANDS:
        try:
            servers = envfile.apply()
        except (envfile.EnvFileError, OSError) as exc:
            return cli_errors.fail(prog, str(exc), cli_errors.RUNTIME_EXIT)
        args.servers = servers  # where each came from (the environment now holds them all)
        # `bench --target URL` uses no server of ours: it names its target itself.
        if getattr(args, "announce_servers", args.command not in QUIET_COMMANDS) \
                and not getattr(args, "target", None):
            print(f"{prog}: {servers.describe()}", file=sys.stderr, flush=True)
    return cli_errors.run(args.func, args, prog=prog, debug=debug, servers=servers)


# ---- this module's subcommands ------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP API under uvicorn")
    serve.add_argument("--host", default=os.environ.get("SLOTGUARD_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("SLOTGUARD_PORT", 8000)))
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--no-access-log", action="store_true",
                       help="turn uvicorn's per-request access log off (benchmarks)")
    serve.set_defaults(func=cmd_serve)

    migrate = subparsers.add_parser("migrate", help="apply the Postgres schema migrations")
    migrate.set_defaults(func=cmd_migrate)

    partners = subparsers.add_parser("partners", help="manage partners")
    partners_sub = partners.add_subparsers(dest="action", metavar="ACTION", required=True)
    create_partner = partners_sub.add_parser("create", help="create a partner")
    create_partner.add_argument("--id", required=True, dest="partner_id")
    create_partner.add_argument("--name", default=None)
    create_partner.set_defaults(func=cmd_partners_create)
    list_partners = partners_sub.add_parser("list", help="list partners")
    list_partners.set_defaults(func=cmd_partners_list)

    vendors = subparsers.add_parser("vendors", help="manage vendors")
    vendors_sub = vendors.add_subparsers(dest="action", metavar="ACTION", required=True)
    create_vendor = vendors_sub.add_parser(
        "create", help="create a vendor and its default resource",
        description="Default: vendor confirmation required, no payment (a free vendor). "
                    "--payment-required needs --price-amount, --deposit-amount and "
                    "--currency (minor units, ISO 4217).")
    create_vendor.add_argument("--id", required=True, dest="vendor_id")
    create_vendor.add_argument("--unit-minutes", type=int, default=15)
    create_vendor.add_argument("--buffer-before-minutes", type=int, default=0)
    create_vendor.add_argument("--buffer-after-minutes", type=int, default=0)
    create_vendor.add_argument("--instant", action="store_true",
                               help="instant book: no vendor confirmation")
    payment = create_vendor.add_mutually_exclusive_group()
    payment.add_argument("--payment-required", dest="payment_required", action="store_true",
                         default=False, help="both parties authorize payment (issue 12)")
    payment.add_argument("--free", dest="payment_required", action="store_false",
                         help="no payment (the default)")
    create_vendor.add_argument("--price-amount", type=int, default=None,
                               help="the requester's price, minor units")
    create_vendor.add_argument("--deposit-amount", type=int, default=None,
                               help="the vendor's deposit, minor units")
    create_vendor.add_argument("--currency", default=None, help="ISO 4217, e.g. usd")
    create_vendor.add_argument("--stripe-account-id", default=None,
                               help="connected account (direct charges of the price)")
    create_vendor.add_argument("--refund-policy", default="full",
                               choices=["full", "none", "full_before"])
    create_vendor.add_argument("--refund-cutoff-minutes", type=int, default=None,
                               help="with --refund-policy full_before")
    create_vendor.add_argument("--timezone", default="UTC")
    create_vendor.set_defaults(func=cmd_vendors_create)
    list_vendors = vendors_sub.add_parser("list", help="list vendors")
    list_vendors.set_defaults(func=cmd_vendors_list)

    keys = subparsers.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create_key = keys_sub.add_parser(
        "create", help="issue an API key; it is printed once, alone on the last line")
    create_key.add_argument("--role", required=True,
                            choices=["partner", "vendor", "ops", "admin", "system"])
    create_key.add_argument("--partner", default=None, dest="partner_id")
    create_key.add_argument("--vendor", default=None, dest="vendor_id")
    create_key.set_defaults(func=cmd_keys_create)
    revoke_key = keys_sub.add_parser("revoke", help="revoke an API key by its id")
    revoke_key.add_argument("key_id")
    revoke_key.set_defaults(func=cmd_keys_revoke)
    list_keys = keys_sub.add_parser("list", help="list API keys (ids and prefixes; never a "
                                                 "secret)")
    list_keys.set_defaults(func=cmd_keys_list)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.settings import Settings

    from engine.runtime import preflight_or_message

    settings = Settings.from_env()  # refuse bad settings here, before uvicorn forks workers
    refusal = preflight_or_message(settings)  # an evicting Redis, another shard count
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    from slotguard.logs import uvicorn_config

    # One format (SLOTGUARD_LOG_FORMAT) for our loggers and uvicorn's (issue 17).
    log_config = uvicorn_config(settings.log_format, args.log_level)
    # Forwarded headers are ours to judge (SLOTGUARD_TRUSTED_PROXIES, api/context.py), never
    # uvicorn's: by default it trusts X-Forwarded-For from loopback.
    # The protocol bounds request heads and read times (api/guard.py); h11's own limit is
    # set too, for whoever swaps the protocol.
    options = dict(host=args.host, port=args.port, loop="uvloop",
                   http="api.guard:GuardedHttpToolsProtocol",
                   log_level=args.log_level, access_log=not args.no_access_log,
                   lifespan="on", log_config=log_config, proxy_headers=False,
                   forwarded_allow_ips="",
                   timeout_keep_alive=settings.keep_alive_timeout_ms / 1000,
                   h11_max_incomplete_event_size=settings.max_header_bytes)
    if args.workers > 1:
        # Each worker process builds its own app (its own Redis client and pool).
        uvicorn.run("api.app:app_from_env", factory=True, workers=args.workers, **options)
    else:
        from api.app import app_from_env

        uvicorn.run(app_from_env(), **options)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from engine import db
    from engine.settings import Settings

    settings = Settings.from_env()
    applied = db.migrate(settings)
    print(f"schema {settings.db_schema}: applied {len(applied)} migration(s)"
          + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_partners_create(args: argparse.Namespace) -> int:
    from engine import directory

    async def run(conn):
        partner = await directory.create_partner(conn, args.partner_id,
                                                 args.name or args.partner_id)
        print(f"partner {partner.id} created")

    return _with_connection(run)


def cmd_vendors_create(args: argparse.Namespace) -> int:
    from engine import directory
    from engine.payments.terms import PaymentTerms

    async def run(conn):
        vendor = await directory.create_vendor(
            conn, args.vendor_id, unit_minutes=args.unit_minutes,
            buffer_before_minutes=args.buffer_before_minutes,
            buffer_after_minutes=args.buffer_after_minutes,
            confirmation_required=not args.instant, timezone=args.timezone,
            terms=PaymentTerms(args.payment_required, args.price_amount, args.deposit_amount,
                               args.currency, args.stripe_account_id, args.refund_policy,
                               args.refund_cutoff_minutes))
        print(f"vendor {vendor.id} created (default resource {vendor.default_resource_id}; "
              f"confirmation {'required' if vendor.confirmation_required else 'waived'}, "
              f"payment {'required' if vendor.payment_required else 'waived'})")

    return _with_connection(run)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from api.auth import issue_key

    if args.role == "partner" and not args.partner_id:
        raise cli_errors.UsageError("a partner key needs --partner PARTNER_ID")
    if args.role == "vendor" and not args.vendor_id:
        raise cli_errors.UsageError("a vendor key needs --vendor VENDOR_ID")

    async def run(conn):
        issued, stored = await issue_key(conn, args.role, partner_id=args.partner_id,
                                         vendor_id=args.vendor_id)
        print(f"key {stored.id} ({stored.role}) created; it is shown once:")
        print(issued.key)

    return _with_connection(run)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from engine import directory

    async def run(conn):
        stored = await directory.revoke_api_key(conn, args.key_id)
        print(f"key {stored.id} revoked")

    return _with_connection(run)


def cmd_partners_list(args: argparse.Namespace) -> int:
    async def run(conn):
        rows = await conn.fetch("SELECT id, name, active FROM partners ORDER BY id")
        _table(["partner", "name", "active"],
               [[r["id"], r["name"], "yes" if r["active"] else "no"] for r in rows])

    return _with_connection(run)


def cmd_vendors_list(args: argparse.Namespace) -> int:
    from engine import directory

    async def run(conn):
        vendors = await directory.list_vendors(conn)
        _table(["vendor", "unit", "confirmation", "payment", "timezone"],
               [[v.id, f"{v.unit_minutes} min",
                 "required" if v.confirmation_required else "waived",
                 "required" if v.payment_required else "waived", v.timezone]
                for v in vendors])

    return _with_connection(run)


def cmd_keys_list(args: argparse.Namespace) -> int:
    async def run(conn):
        rows = await conn.fetch("""SELECT id, prefix, role, partner_id, vendor_id, revoked_at
                                   FROM api_keys ORDER BY created_at, id""")
        _table(["key", "prefix", "role", "tenant", "revoked"],
               [[r["id"], r["prefix"], r["role"], r["partner_id"] or r["vendor_id"] or "-",
                 "yes" if r["revoked_at"] else "no"] for r in rows])

    return _with_connection(run)


def _table(header: list[str], rows: list[list[str]]) -> None:
    """Plain columns on stdout (no width limit: a log keeps every character)."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _with_connection(run) -> int:
    """Run ``run(conn)`` on one connection to the configured schema; errors to stderr."""
    from engine import db
    from engine.settings import Settings

    settings = Settings.from_env()

    async def go() -> int:
        # Failures reach slotguard/cli_errors.py, which prints them as one line.
        pool = await db.create_pool(settings, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                await run(conn)
            return 0
        finally:
            await pool.close()

    return asyncio.run(go())


if __name__ == "__main__":
    raise SystemExit(main())
