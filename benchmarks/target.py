"""``slotguard bench --target URL --key KEY``: load a running deployment through its API only.

No access to its Redis or Postgres: the set-up, the load and the verification all go
through HTTP. The partner key books; the vendor is ``--vendor`` (default ``demo-vendor``,
what ``slotguard up`` creates; its unit comes from the availability route's answer) or,
with ``--admin-key``, a vendor the bench creates for itself (instant book, free, four
resources) through the admin API.

Phases (the load processes and raw HTTP/1.1 transport of every HTTP phase,
benchmarks/http_client.py; the routes are the partner client's):

1. ``hot``: every connection fights for ``hot_slots`` slots; a winner cancels at once;
2. ``distinct``: every create its own slot; winners cancel (the live-hold cap stays clear);
3. ``walk``: create → vendor-confirmation → commit with ``--vendor-key``, or create →
   commit on the bench's own instant vendor; skipped otherwise (a note says why).

The intervals start on a day of the run's own (two to 60 days ahead, on the unit grid),
so runs rarely meet each other's bookings; a conflict with a reservation the run did not
make is a conflict, never a violation. What the run leaves: cancelled reservations, and
the walk's bookings (COMMITTED).

The verifier reads back every reservation the run created (``GET /v1/reservations/{id}``,
through :class:`slotguard.client.AsyncClient`) and checks, from the answers alone:

- ``missing_reservation``: a create answered 201 but the reservation cannot be read;
- ``slot_differs``: the reservation is not on the slot and resource the create asked for;
- ``double_booking``: two reservations of the run overlap on one resource while both were
  live (from their ``stateHistory``: created → the first CANCELLED/EXPIRED/FAILED_*
  transition; COMMITTED or still live = to the end). Vendor buffers are not visible to a
  partner, so overlap here is of the slots themselves (a weaker check than the local
  verifier's, never a false alarm).

Accepted commits are waited for (bounded) and counted by final state.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import random
import shlex
import sys
import time
from collections import defaultdict
from typing import Any
from urllib.parse import urlsplit

from benchmarks import history as h
from benchmarks.load import LoadSpec, Pattern, ResourceSpec, run_phase
from slotguard.client import (ApiError, AsyncClient, Client, NotFound, RetryExhausted,
                              RetryPolicy)

DAY_MS = 86_400_000
TERMINAL_LOST = ("CANCELLED", "EXPIRED")  # + every FAILED_*: the units are free again
VERIFY_CONCURRENCY = 32
COMMIT_WAIT_S = 60.0


def main(args: argparse.Namespace, console) -> int:
    from benchmarks.cli import build_config, finish

    if not args.key:
        raise SystemExit("slotguard bench --target: --key KEY (a partner key) is required")
    parts = urlsplit(args.target)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"slotguard bench --target: {args.target!r} is not an http:// URL "
                         "(the load client speaks plain HTTP/1.1; put a TLS deployment "
                         "behind a local proxy)")
    config = build_config(args)
    results = asyncio.run(run(args, config, console))
    return finish(args, results, console)


def _short(key: str | None) -> str:
    return "-" if not key else key[:12] + "…"


async def run(args: argparse.Namespace, config, console) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from benchmarks.cpu import machine
    from benchmarks.scenarios import config_dict

    started = time.monotonic()
    base = args.target.rstrip("/")
    results: dict[str, Any] = {
        "slotguard_bench": 1, "mode": "target",
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "slotguard bench " + " ".join(
            shlex.quote(a if not a.startswith("sg_") else _short(a)) for a in sys.argv[1:]
            if a != "bench"),
        "machine": machine(), "config": config_dict(config), "scenario_names": ["target"],
        "targets": [],
    }
    setup = await asyncio.to_thread(prepare, base, args)
    results["servers"] = {"source": "target (API only)", "url": base,
                          "vendor": setup["vendor"], "resources": setup["resource_ids"],
                          "unit_minutes": setup["unit_minutes"],
                          "partner_key": _short(args.key)}
    console.print(f"servers (target, API only): {base}; vendor {setup['vendor']} "
                  f"({setup['how']}), resources {', '.join(setup['resource_ids'])}, "
                  f"unit {setup['unit_minutes']} min; partner key {_short(args.key)}; "
                  f"slots from {setup['day']}", markup=False, highlight=False, soft_wrap=True)
    progress = Progress(TextColumn("{task.description:<48}"), BarColumn(), TextColumn(
        "{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=console,
        disable=args.no_progress, transient=False)
    tasks: dict[str, int] = {}

    def tick(label: str):
        def on(fraction: float) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=1.0)
            progress.update(tasks[label], completed=fraction)
        return on

    entries: list[h.Entry] = []
    phases: dict[str, Any] = {}
    notes: list[str] = []
    resources = tuple(setup["resources"])
    t0 = setup["t0_ms"]
    http = {"host": urlsplit(base).hostname, "port": urlsplit(base).port or 80,
            "partner_key": args.key, "idempotency": True,
            "vendor_keys": {setup["vendor"]: args.vendor_key} if args.vendor_key else {}}
    plan = [("hot", "target: hot slot (create; winners cancel)", "http_create",
             Pattern("hot", resources, hot_slots=config.hot_slots, t0=t0), True)]
    plan.append(("distinct", "target: distinct slots (create; cancel)", "http_create",
                 Pattern("distinct", resources, t0=t0 + DAY_MS), True))
    if args.vendor_key or setup["instant"]:
        kind = "http_walk" if not setup["instant"] else "http_create_commit"
        plan.append(("walk", "target: create, confirm, commit" if not setup["instant"]
                     else "target: create, commit (instant vendor)", kind,
                     Pattern("distinct", resources, t0=t0 + 2 * DAY_MS), False))
    else:
        notes.append("walk skipped: the vendor needs confirmation and no --vendor-key was "
                     "given (or pass --admin-key for a vendor of the bench's own)")
    from engine.settings import Settings

    settings = Settings.from_env({})
    with progress:
        for name, label, workload, pattern, release in plan:
            spec = LoadSpec(workload=workload, pattern=pattern, settings=settings,
                            processes=config.processes, concurrency=config.concurrency,
                            seconds=config.seconds, max_ops=config.max_ops,
                            release_winners=release, seed=1, http=http,
                            start_delay_s=config.start_delay_s)
            result = await asyncio.to_thread(run_phase, spec, tick(label))
            tick(label)(1.0)
            if result.errors:
                notes.append(f"{name}: {'; '.join(result.errors)[:300]}")
            summary = dict(result.summary)
            summary["workload"], summary["pattern"] = workload, pattern.kind
            phases[name] = summary
            entries += result.history
        verify_label = "target: reading back every reservation"
        report = await verify(base, args.key, resources, entries, tick(verify_label))
        tick(verify_label)(1.0)
    scenario = {"description": "a running deployment loaded and verified through its API",
                "phases": phases, "verifier": report, "violations": report["violations"],
                "notes": notes + report.pop("notes"), "targets": []}
    create = phases.get("distinct") or {}
    p99 = (create.get("latency_ms") or {}).get("p99")
    connections = config.processes * config.concurrency
    scenario["targets"] = [
        _target(f"p99 of a create <= 25 ms ({connections} connections, distinct slots)",
                p99, 25.0, higher=False),
        _target("no request answered with an error (5xx, 429, no answer)",
                sum(p.get("outcomes", {}).get("error", 0) for p in phases.values()), 0,
                higher=False),
    ]
    results["scenarios"] = {"target": scenario}
    results["machine_end"] = machine()
    results["violations"] = report["violations"]
    results["exit_code"] = 1 if report["violations"] else (2 if not phases else 0)
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def _target(name: str, value, bound: float, *, higher: bool = True) -> dict[str, Any]:
    met = None if value is None else (value >= bound if higher else value <= bound)
    return {"target": name, "value": value, "bound": bound,
            "direction": ">=" if higher else "<=", "met": met}


# ---- set-up through the API --------------------------------------------------------------
def prepare(base: str, args: argparse.Namespace) -> dict[str, Any]:
    """The vendor, its resources and unit, and the run's first day; blocking."""
    now_ms = int(time.time() * 1000)
    rng = random.Random()
    day = (now_ms // DAY_MS + 2 + rng.randrange(58)) * DAY_MS  # 2..60 days ahead
    policy = RetryPolicy(attempts=3, base_delay_s=0.5)
    if args.admin_key:
        run = f"bench-{rng.randrange(16**8):08x}"
        with Client(base, args.admin_key, policy=policy) as admin:
            vendor = admin.create_vendor(run, unit_minutes=15, confirmation_required=False,
                                         payment_required=False)
            ids = [vendor.default_resource_id]
            for i in range(1, 4):
                ids.append(admin.create_resource(f"{run}-r{i}", run).resource_id)
        unit = 15
        how, instant, vendor_id = "created through the admin API", True, run
    else:
        vendor_id = args.vendor or "demo-vendor"
        with Client(base, args.key, policy=policy) as sg:
            unit, resource_id = _probe(sg, vendor_id, day)
        ids, how, instant = [resource_id], "given", False
    unit_ms = unit * 60_000
    resources = [ResourceSpec(i, unit_ms=unit_ms, vendor_id=vendor_id) for i in ids]
    return {"vendor": vendor_id, "resource_ids": ids, "resources": resources,
            "unit_minutes": unit, "how": how, "instant": instant, "t0_ms": day,
            "day": datetime.datetime.fromtimestamp(day / 1000, datetime.UTC)
            .strftime("%Y-%m-%d")}


def _probe(sg: Client, vendor_id: str, day_ms: int) -> tuple[int, str]:
    """The vendor's unit (minutes) and default resource, from the availability route: a
    slot of one minute is refused with the unit in the details unless the unit is 1."""
    from api.validation import format_time

    window = dict(start_time=format_time(day_ms), end_time=format_time(day_ms + DAY_MS))
    try:
        found = sg.availability(vendor_id, slot_duration=1, **window)
        return 1, found.resource_id
    except ApiError as exc:
        unit = exc.details.get("unitMinutes")
        if exc.code != "SLOT_DURATION_NOT_ALIGNED" or not unit:
            raise SystemExit(f"slotguard bench --target: vendor {vendor_id!r}: {exc}") from None
    unit = int(unit)
    found = sg.availability(vendor_id, slot_duration=unit, **window)
    return unit, found.resource_id


# ---- verification through the API ---------------------------------------------------------
async def verify(base: str, key: str, resources, entries: list[h.Entry], tick) -> dict:
    """Read back every reservation the run created; the checks of the module docstring."""
    by_id = {r.id: r for r in resources}
    created = {e.id: e for e in entries if e.op == h.CREATE and e.outcome == h.OK}
    committed = {e.id for e in entries if e.op == h.COMMIT and e.outcome == h.OK}
    reads: dict[str, Any] = {}
    missing: list[str] = []
    unreadable: list[str] = []
    policy = RetryPolicy(attempts=5, base_delay_s=0.2, max_delay_s=5)
    async with AsyncClient(base, key, policy=policy) as client:
        queue = list(created)
        done = 0

        async def reader() -> None:
            nonlocal done
            while queue:
                rid = queue.pop()
                try:
                    reads[rid] = await client.get_reservation(rid)
                except NotFound:
                    missing.append(rid)
                except (ApiError, RetryExhausted):
                    unreadable.append(rid)
                done += 1
                if done % 50 == 0:
                    tick(done / max(1, len(created)))

        await asyncio.gather(*(reader() for _ in range(VERIFY_CONCURRENCY)))
        # Accepted commits: the commit queue finishes them; wait (bounded) and count.
        pending = {rid for rid in committed if rid in reads
                   and reads[rid].state == "COMMIT_IN_PROGRESS"}
        deadline = time.monotonic() + COMMIT_WAIT_S
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            for rid in list(pending)[:200]:
                try:
                    reads[rid] = await client.get_reservation(rid)
                except (ApiError, RetryExhausted):
                    continue
                if reads[rid].state != "COMMIT_IN_PROGRESS":
                    pending.discard(rid)
    violations: list[dict[str, Any]] = [
        {"kind": "missing_reservation", "ids": [rid], "detail": "created (201), then 404"}
        for rid in missing]
    for rid, read in reads.items():
        entry = created[rid]
        resource = by_id.get(entry.resource)
        first, last = resource.units(_ms(read.slot_start_time), _ms(read.slot_end_time)) \
            if resource else (None, None)
        if read.resource_id != entry.resource or (first, last) != (entry.first, entry.last):
            violations.append({"kind": "slot_differs", "ids": [rid],
                               "detail": f"asked {entry.resource} units {entry.first}.."
                                         f"{entry.last}, read {read.resource_id} "
                                         f"{read.slot_start_time}..{read.slot_end_time}"})
    violations += double_bookings(reads, {r.id: r.unit_ms for r in resources})
    states: dict[str, int] = defaultdict(int)
    for rid in committed:
        if rid in reads:
            states[reads[rid].state] += 1
    notes = [f"read back {len(reads)} of {len(created)} created reservations"
             + (f"; {len(unreadable)} could not be read (errors)" if unreadable else ""),
             "accepted commits by final state: "
             + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none")]
    return {"checked_reservations": len(reads), "created": len(created),
            "unreadable": len(unreadable), "commits_accepted": len(committed),
            "commit_final_states": dict(states), "violations": len(violations),
            "violation_details": [{**v, "ids": v["ids"][:4]} for v in violations[:50]],
            "notes": notes}


def _ms(iso: str) -> int:
    return int(datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def live_window(read) -> tuple[int, float]:
    """[created, lost) in server ms from the state history; lost = inf when never lost."""
    times = [(_ms(t.timestamp), t.to_state) for t in read.state_history]
    start = min((t for t, _ in times), default=_ms(read.created_at))
    for at, state in sorted(times):
        if state in TERMINAL_LOST or state.startswith("FAILED_"):
            return start, float(at)
    return start, float("inf")


def double_bookings(reads: dict[str, Any], unit_ms: dict[str, int]) -> list[dict[str, Any]]:
    """Pairs of reservations holding one unit of one resource while both were live: per
    unit, the live windows sorted by start must not overlap (one pass, O(n log n))."""
    per_unit: dict[tuple[str, int], list] = defaultdict(list)
    for rid, read in reads.items():
        unit = unit_ms.get(read.resource_id)
        if not unit:
            continue
        window = live_window(read)
        start, end = _ms(read.slot_start_time), _ms(read.slot_end_time)
        for index in range(start // unit, -(-end // unit)):
            per_unit[(read.resource_id, index)].append((*window, rid))
    found, seen = [], set()
    for (resource, index), windows in per_unit.items():
        windows.sort()
        longest = windows[0]
        for window in windows[1:]:
            if window[0] < longest[1]:  # live before the one still live was lost
                pair = tuple(sorted((longest[2], window[2])))
                if pair not in seen:
                    seen.add(pair)
                    found.append({"kind": "double_booking", "ids": list(pair),
                                  "detail": f"{resource} unit {index}: both live at once"})
            if window[1] > longest[1]:
                longest = window
    return found
