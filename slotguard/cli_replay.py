"""``slotguard replay`` and ``slotguard parity`` (issue 17; engine/parity.py).

    slotguard replay --reservation-id ID [--stdout | --output PATH] [--fail-on-drift]
    slotguard parity [--since WHEN] [--settle-s N] [--textfile PATH] [--fail-on-drift]

``replay`` rebuilds one reservation from its audit rows and compares its history rows,
reservation row, booking row and Redis record; the report (``{"reservationId", "events":
[{"eventId", "status", "details"}], "summary"}``) goes to ``--output PATH``, to stdout with
``--stdout``, or by default to ``.slotguard/replay/reservation-<id>.json`` (its path and a
one-line summary are printed). ``parity`` does it for every reservation changed since
``--since`` (an ISO time or an age: ``90s``, ``15m``, ``6h``, ``7d``; default all) except
the last ``--settle-s`` seconds (default 60: still in the commit queue), prints the summary
as JSON, sets ``slotguard_parity_drift_events`` and with ``--textfile`` writes it for
node_exporter's textfile collector (the worker's parity cron publishes the same gauge on
its ``/metrics``). Exit 0, also when drift is found, unless ``--fail-on-drift`` (then 3);
1 when the reservation is unknown or a server cannot be reached; 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path

DRIFT_EXIT = 3
_AGE = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(subparsers: argparse._SubParsersAction) -> None:
    replay = subparsers.add_parser(
        "replay", help="rebuild a reservation from its audit rows and compare the stores",
        description=__doc__.split("\n\n")[2])
    replay.add_argument("--reservation-id", required=True, dest="reservation_id")
    out = replay.add_mutually_exclusive_group()
    out.add_argument("--stdout", action="store_true", help="print the JSON report")
    out.add_argument("--output", type=Path, metavar="PATH", help="write the JSON report here")
    replay.add_argument("--fail-on-drift", action="store_true",
                        help=f"exit {DRIFT_EXIT} when any event is not a match")
    replay.set_defaults(func=cmd_replay)

    parity = subparsers.add_parser(
        "parity", help="replay every recently changed reservation; drift counts",
        description="Replay every reservation changed since --since against its audit rows; "
                    "print the summary; set slotguard_parity_drift_events.")
    parity.add_argument("--since", type=since_ms, default=None, metavar="WHEN",
                        help="an ISO 8601 time or an age (90s, 15m, 6h, 7d); default all")
    parity.add_argument("--settle-s", type=int, default=60, metavar="N",
                        help="skip reservations changed in the last N seconds (default 60)")
    parity.add_argument("--textfile", type=Path, metavar="PATH",
                        help="write the drift gauge in the Prometheus text format")
    parity.add_argument("--fail-on-drift", action="store_true",
                        help=f"exit {DRIFT_EXIT} when any drift is found")
    parity.set_defaults(func=cmd_parity)


def since_ms(text: str) -> int:
    """An ISO 8601 time, or an age before now (``15m``), as epoch milliseconds."""
    match = _AGE.match(text.strip())
    if match:
        return int(time.time() * 1000) - int(match[1]) * _UNIT_S[match[2]] * 1000
    from engine.errors import ValidationError
    from engine.times import parse_time

    try:
        return parse_time(text, "since")
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"not a time or an age: {text!r} ({exc.message})") \
            from None


async def _open(settings):
    import redis.asyncio as aioredis

    from engine import db
    from engine.access import RedisAccess
    from engine.keys import KeySpace
    from engine.reservations import ReservationEngine
    from engine.resources import ResourceCatalog

    pool = await db.create_pool(settings, min_size=1, max_size=8)
    client = aioredis.Redis.from_url(settings.redis_url)
    access = RedisAccess(client)
    await access.load_scripts()
    engine = ReservationEngine(access, KeySpace(settings.key_prefix, settings.shards),
                               ResourceCatalog([]), settings)

    async def close() -> None:
        await access.close()
        await client.aclose()
        await pool.close()

    return pool, engine.get, close


def _settings():
    from engine.settings import Settings

    return Settings.from_env()


def cmd_replay(args: argparse.Namespace) -> int:
    import orjson

    from engine import parity

    async def go():
        pool, read, close = await _open(_settings())
        try:
            return await parity.replay(pool, read, args.reservation_id)
        finally:
            await close()

    report = asyncio.run(go())
    if report is None:
        print(f"slotguard replay: reservation {args.reservation_id} is unknown (no audit "
              "row, history row, reservation row, booking or Redis record)", file=sys.stderr)
        return 1
    body = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    summary = report["summary"]
    line = (f"{args.reservation_id}: {summary['events']} events, {summary['match']} match, "
            f"{summary['diff']} diff, {summary['missing']} missing, {summary['extra']} extra")
    if args.stdout:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    else:
        path = args.output or Path(".slotguard") / "replay" / \
            f"reservation-{args.reservation_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        print(f"{line}; report: {path}")
    return DRIFT_EXIT if args.fail_on_drift and summary["drift"] else 0


def cmd_parity(args: argparse.Namespace) -> int:
    import orjson

    from engine import parity

    if args.settle_s < 0:
        print("slotguard parity: --settle-s must be >= 0 (see --help)", file=sys.stderr)
        return 2

    async def go():
        pool, read, close = await _open(_settings())
        try:
            return await parity.parity(pool, read, since_ms=args.since,
                                       settle_ms=args.settle_s * 1000)
        finally:
            await close()

    summary = asyncio.run(go())
    parity.publish(summary)
    if args.textfile:
        args.textfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.textfile.with_suffix(args.textfile.suffix + ".tmp")
        tmp.write_text(parity.textfile(summary))
        tmp.replace(args.textfile)  # atomic: the collector never reads half a file
    sys.stdout.buffer.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    return DRIFT_EXIT if args.fail_on_drift and summary["drift"] else 0
