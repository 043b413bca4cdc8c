"""``slotguard rekey`` and ``slotguard optimize`` (issue 16, pool).

- ``rekey --vendor V [--apply]``: give every resource of V the vendor's id as shard key, so
  its resources share one hash tag (groups, pooled holds); booked markers and fencing
  counters move with them. Refused while any of those resources has a live hold: quiesce the
  vendor first, and restart ``serve``/``worker`` afterwards (they cache shard keys).
- ``optimize --vendor V --date D [--apply]``: re-plan the day's live holds of each of V's
  resource groups to reduce fragmentation; a dry run prints the plan and the gain; with
  ``--apply`` the moves are made (modify script, reason ``optimizer``) when the gain is over
  SLOTGUARD_OPTIMIZER_MIN_GAIN_PERCENT.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import date


def register(subparsers: argparse._SubParsersAction) -> None:
    rekey = subparsers.add_parser(
        "rekey", help="move a vendor's resources under the vendor's shard hash tag")
    rekey.add_argument("--vendor", required=True, dest="vendor_id")
    rekey.add_argument("--apply", action="store_true", help="do it (default: a dry run)")
    rekey.set_defaults(func=cmd_rekey)
    optimize = subparsers.add_parser(
        "optimize", help="re-plan a vendor's pooled holds of a day to reduce fragmentation")
    optimize.add_argument("--vendor", required=True, dest="vendor_id")
    optimize.add_argument("--date", required=True, type=date.fromisoformat,
                          help="the day, YYYY-MM-DD, in the vendor's time zone")
    optimize.add_argument("--apply", action="store_true",
                          help="make the moves when the gain is over the threshold")
    optimize.set_defaults(func=cmd_optimize)


def cmd_rekey(args: argparse.Namespace) -> int:
    from engine.pool import rekey_vendor

    async def run(rt) -> None:
        async with rt.pool.acquire() as conn:
            report = await rekey_vendor(conn, rt.redis, rt.keys, args.vendor_id,
                                        apply=args.apply)
        verb = "re-keyed" if report.applied else "would re-key"
        print(f"vendor {report.vendor_id}: {verb} {len(report.resources)} resource(s) "
              f"{', '.join(report.resources) or '-'}; booked markers "
              f"{'moved' if report.applied else 'to move'}: {report.markers_moved}")
        if report.applied and report.resources:
            print("restart slotguard serve and worker processes: they cache shard keys")

    return _with_runtime(run)


def cmd_optimize(args: argparse.Namespace) -> int:
    from engine.optimizer import optimize
    from engine.pool import GroupService

    async def run(rt) -> None:
        from engine.catalog_cache import CatalogCache

        groups = GroupService(rt.pool, CatalogCache(rt.pool, rt.catalog), rt.keys,
                              rt.settings.pool_max_members, access=rt.access)
        plans = await optimize(rt, groups, args.vendor_id, args.date, apply=args.apply,
                               min_gain_percent=rt.settings.optimizer_min_gain_percent)
        print(render(plans, args.apply))

    return _with_runtime(run)


def render(plans, applied: bool) -> str:
    lines = []
    for p in plans:
        lines.append(f"group {p.group_id}: fragmentation {p.before} -> {p.after} "
                     f"(gain {p.gain_percent:.1f} %), {len(p.moves)} move(s)"
                     + (f"; {p.note}" if p.note else ""))
        for m in p.moves:
            state = ""
            if applied:
                state = "  moved" if m.reservation_id in p.applied else ""
                state = state or next(("  skipped: " + why for rid, why in p.skipped
                                       if rid == m.reservation_id), "")
            lines.append(f"  {m.reservation_id}: {m.from_resource} -> {m.to_resource}{state}")
    return "\n".join(lines) if lines else "no resource groups"


def _with_runtime(run) -> int:
    from engine.errors import EngineError
    from engine.runtime import Runtime
    from engine.settings import Settings

    async def go() -> int:
        rt = await Runtime.open(Settings.from_env(), pool_max_size=2)
        try:
            await run(rt)
            return 0
        except EngineError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await rt.close()

    return asyncio.run(go())
