"""``slotguard availability …``: a vendor's availability inputs from the command line
(issue 13). Every command goes through the same service the API uses
(engine/availability_service.py) as a system principal, against the configured Postgres
and Redis (``SLOTGUARD_*`` / ``DATABASE_URL`` / ``REDIS_URL``), so a change is validated
the same way, published to every API process and revalidates live reservations.

    slotguard availability schedule set VENDOR FILE.json   # the PUT body; '-' reads stdin
    slotguard availability schedule show VENDOR
    slotguard availability blocks add VENDOR --start T --end T [--status tentative]
                                             [--source S] [--resource R]
    slotguard availability blocks list VENDOR
    slotguard availability blocks delete VENDOR BLOCK_ID
    slotguard availability calendar import VENDOR CALENDAR_ID FILE.ics
    slotguard availability show VENDOR --start T --end T [--slot-minutes N] [--resource R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from engine.permissions import Principal

SYSTEM = Principal(key_id="cli", role="system")


def register(subparsers: argparse._SubParsersAction) -> None:
    root = subparsers.add_parser("availability",
                                 help="vendors' schedules, busy blocks and calendars")
    groups = root.add_subparsers(dest="group", metavar="GROUP", required=True)

    schedule = groups.add_parser("schedule", help="working hours").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    put = schedule.add_parser("set", help="replace a vendor's schedule (JSON as the API's PUT)")
    put.add_argument("vendor_id")
    put.add_argument("file", help="a JSON file, or - for stdin")
    put.set_defaults(func=cmd_schedule_set)
    show = schedule.add_parser("show", help="print a vendor's schedule")
    show.add_argument("vendor_id")
    show.set_defaults(func=cmd_schedule_show)

    blocks = groups.add_parser("blocks", help="busy blocks").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    add = blocks.add_parser("add", help="add a busy (or tentative) block")
    add.add_argument("vendor_id")
    add.add_argument("--start", required=True, help="ISO 8601 with an offset")
    add.add_argument("--end", required=True, help="ISO 8601 with an offset")
    add.add_argument("--status", choices=["busy", "tentative"], default="busy")
    add.add_argument("--source", default="cli")
    add.add_argument("--resource", default=None, help="only this resource of the vendor")
    add.set_defaults(func=cmd_blocks_add)
    listing = blocks.add_parser("list", help="list a vendor's busy blocks")
    listing.add_argument("vendor_id")
    listing.set_defaults(func=cmd_blocks_list)
    delete = blocks.add_parser("delete", help="delete a busy block")
    delete.add_argument("vendor_id")
    delete.add_argument("block_id")
    delete.set_defaults(func=cmd_blocks_delete)

    calendar = groups.add_parser("calendar", help="ICS calendars").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    imp = calendar.add_parser("import", help="replace one calendar's blocks with an ICS file")
    imp.add_argument("vendor_id")
    imp.add_argument("calendar_id")
    imp.add_argument("file", help="an .ics file, or - for stdin")
    imp.set_defaults(func=cmd_calendar_import)

    answer = groups.add_parser("show", help="print the computed slots of a range")
    answer.add_argument("vendor_id")
    answer.add_argument("--start", required=True)
    answer.add_argument("--end", required=True)
    answer.add_argument("--slot-minutes", type=int, default=None)
    answer.add_argument("--resource", default=None)
    answer.set_defaults(func=cmd_show)


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as handle:
        return handle.read()


def _run(action) -> int:
    """Run ``action(service)`` on a runtime opened from the environment; errors to stderr."""
    from engine.availability_service import AvailabilityService
    from engine.catalog_cache import CatalogCache
    from engine.errors import EngineError
    from engine.runtime import Runtime
    from engine.settings import Settings

    settings = Settings.from_env()

    async def go() -> int:
        rt = await Runtime.open(settings, pool_max_size=2)
        try:
            catalog = CatalogCache(rt.pool, rt.catalog)
            await catalog.load()
            service = AvailabilityService(rt.pool, rt.access, rt.keys, catalog, settings)
            out = await action(service)
            if out is not None:
                print(json.dumps(out, indent=2, sort_keys=False))
            return 0
        except EngineError as exc:
            print(f"error: {exc.code}: {exc.message} {json.dumps(exc.details)}",
                  file=sys.stderr)
            return 1
        finally:
            await rt.close()

    return asyncio.run(go())


def _block(vendor_id, b) -> dict:
    from engine.times import format_time

    return {"blockId": b.block_id, "vendorId": vendor_id, "start": format_time(b.start_ms),
            "end": format_time(b.end_ms), "status": b.status, "source": b.source,
            "resourceId": b.resource_id, "calendarId": b.calendar_id}


def cmd_schedule_set(args: argparse.Namespace) -> int:
    try:
        document = json.loads(_read(args.file))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the schedule: {exc}", file=sys.stderr)
        return 1
    return _run(lambda s: s.put_schedule(SYSTEM, args.vendor_id, document))


def cmd_schedule_show(args: argparse.Namespace) -> int:
    return _run(lambda s: s.get_schedule(SYSTEM, args.vendor_id))


def cmd_blocks_add(args: argparse.Namespace) -> int:
    async def action(s):
        block = await s.add_block(SYSTEM, args.vendor_id, start=args.start, end=args.end,
                                  status=args.status, source=args.source,
                                  resource_id=args.resource)
        return _block(args.vendor_id, block)

    return _run(action)


def cmd_blocks_list(args: argparse.Namespace) -> int:
    async def action(s):
        return [_block(args.vendor_id, b) for b in await s.list_blocks(SYSTEM, args.vendor_id)]

    return _run(action)


def cmd_blocks_delete(args: argparse.Namespace) -> int:
    async def action(s):
        block = await s.delete_block(SYSTEM, args.vendor_id, args.block_id)
        return {"blockId": block.block_id, "deleted": True}

    return _run(action)


def cmd_calendar_import(args: argparse.Namespace) -> int:
    try:
        body = _read(args.file)
    except OSError as exc:
        print(f"error: cannot read the calendar: {exc}", file=sys.stderr)
        return 1

    async def action(s):
        from engine.times import format_time

        result = await s.import_calendar(SYSTEM, args.vendor_id, args.calendar_id, body,
                                         "text/calendar")
        return {**result, "expandedUntil": format_time(result["expandedUntil"])}

    return _run(action)


def cmd_show(args: argparse.Namespace) -> int:
    async def action(s):
        from engine.times import format_time

        pairs = [("startTime", args.start), ("endTime", args.end),
                 ("includeConfidence", "true")]
        if args.slot_minutes is not None:
            pairs.append(("slotDuration", str(args.slot_minutes)))
        if args.resource is not None:
            pairs.append(("resourceId", args.resource))
        a = await s.read(SYSTEM, args.vendor_id, pairs)
        return {"vendorId": a.vendor_id, "computedVersion": a.computed_version,
                "slots": [{"startTime": format_time(x.start_ms),
                           "endTime": format_time(x.end_ms), "isAvailable": x.is_available,
                           "confidence": x.confidence, "reasons": x.reasons}
                          for x in a.slots]}

    return _run(action)
