"""``slotguard bench`` (also ``python -m benchmarks``): run the scenarios, verify, report.

Exit code: 0 when every scenario ran and the verifier found nothing; 1 on any verifier
violation; 2 when a scenario could not run. Speed never fails a run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.scenarios import FULL, QUICK, SCENARIOS, BenchConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", "-s", action="append", dest="scenarios",
                        metavar="NAME", help=f"run only these (repeatable, or comma "
                        f"separated): {', '.join(SCENARIOS)}; default all")
    parser.add_argument("--quick", action="store_true",
                        help="short phases and small backlogs: under 60 s, for CI")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the full results")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="write report.md, report.html and PNG plots")
    parser.add_argument("--seconds", type=float, help="seconds per load phase")
    parser.add_argument("--processes", type=int, help="client processes per phase")
    parser.add_argument("--connections", type=int,
                        help="tasks / keep-alive connections per client process")
    parser.add_argument("--http-workers", type=int, help="uvicorn workers (API and baseline)")
    parser.add_argument("--queue-workers", type=int, help="commit-queue worker processes")
    parser.add_argument("--drain-backlog", type=int, help="reservations in the drain backlog")
    parser.add_argument("--scale-sizes", type=_sizes, metavar="N,N,...",
                        help="live reservations of the scale scenario (default "
                             "1000,10000,100000,1000000; --quick 500,2000)")
    parser.add_argument("--scale-bookings", type=_sizes, metavar="N,N,...",
                        help="bookings already in the table for the scale scenario's drains "
                             "(default 10000,1000000; --quick 5000)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--schema", default=None,
                        help="Postgres schema to use (kept afterwards); default a fresh "
                             "bench_<id> schema, dropped at the end")
    parser.add_argument("--keep", action="store_true",
                        help="keep keys, schema and logs for inspection")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--fail-on-target", action="store_true",
                        help="exit 1 when any target is missed (listed at the end either way)")
    # Issue 17: load a running deployment through its API only (benchmarks/target.py).
    parser.add_argument("--target", metavar="URL",
                        help="a running slotguard API to load through HTTP only (no server "
                             "access; the verifier reads back through the API); needs --key")
    parser.add_argument("--key", metavar="KEY", help="--target: a partner API key")
    parser.add_argument("--vendor", metavar="ID", default=None,
                        help="--target: the vendor to book (default demo-vendor, the one "
                             "`slotguard up` creates)")
    parser.add_argument("--vendor-key", metavar="KEY", default=None,
                        help="--target: that vendor's key, for the create-confirm-commit walk")
    parser.add_argument("--admin-key", metavar="KEY", default=None,
                        help="--target: an admin key; the bench then creates a vendor of its "
                             "own (instant, free) instead of using --vendor")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(float(part)) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    return sizes


def parse_scenarios(values: list[str] | None) -> list[str]:
    if not values:
        return list(SCENARIOS)
    names = []
    for value in values:
        for name in value.replace("-", "_").split(","):
            name = name.strip()
            if name not in SCENARIOS:
                raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
            if name not in names:
                names.append(name)
    return names


def build_config(args: argparse.Namespace) -> BenchConfig:
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for arg, field in (("seconds", "seconds"), ("processes", "processes"),
                       ("connections", "concurrency"), ("http_workers", "http_workers"),
                       ("queue_workers", "queue_workers"), ("drain_backlog", "drain_backlog"),
                       ("scale_sizes", "scale_sizes"), ("scale_bookings", "scale_bookings")):
        value = getattr(args, arg, None)
        if value is not None:
            changes[field] = value
    from dataclasses import replace

    return replace(base, **changes)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    if getattr(args, "target", None):
        from benchmarks.target import main as target_main

        return target_main(args, console)
    if getattr(args, "key", None) or getattr(args, "vendor_key", None) \
            or getattr(args, "admin_key", None):
        raise SystemExit("slotguard bench: --key, --vendor-key and --admin-key go with "
                         "--target URL (see --help)")
    names = parse_scenarios(args.scenarios)
    config = build_config(args)
    results = asyncio.run(_run(args, names, config, console))
    return finish(args, results, console)


def finish(args: argparse.Namespace, results: dict[str, Any], console) -> int:
    """Tables, summary, files, the missed targets, and the exit code."""
    from benchmarks.report import (console_table, missed_targets, summary_lines,
                                   targets_table, write_json, write_report)

    print_wide(console, console_table(results))
    for line in summary_lines(results):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if results.get("targets"):
        print_wide(console, targets_table(results))
    if args.json:
        write_json(results, args.json)
        console.print(f"results: {args.json}", soft_wrap=True)
    if args.report:
        console.print(f"report: {write_report(results, args.report)}", soft_wrap=True)
    missed = missed_targets(results)
    if missed:
        console.print(f"missed targets ({len(missed)}):", soft_wrap=True)
        for line in missed:
            console.print(f"  - {line}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("missed targets: none", soft_wrap=True)
    if getattr(args, "fail_on_target", False) and missed and results["exit_code"] == 0:
        results["exit_code"] = 1
        console.print("--fail-on-target: exit 1", soft_wrap=True)
    console.print(f"{results['violations']} violations in {results['seconds']} s; "
                  f"exit {results['exit_code']}", soft_wrap=True)
    return results["exit_code"]


def print_wide(console, renderable) -> None:
    """A table at its natural width: cut to the terminal on a terminal, whole in a log
    (rich would fold it to 80 columns when the output is not a terminal)."""
    if console.is_terminal:
        console.print(renderable)
        return
    from rich.console import Console

    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(10_000), renderable)
    width = max(80, natural.maximum)
    Console(file=console.file, width=width, color_system=None).print(renderable)


def describe_servers(settings, source: str) -> str:
    """Which servers a run uses, passwords hidden (the console names them, issue 17)."""
    return (f"servers ({source}): redis {redact(settings.redis_url)}, postgres "
            f"{redact(settings.database_url)}; key prefix {settings.key_prefix}, schema "
            f"{settings.db_schema}")


def redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def _run(args, names: list[str], config: BenchConfig, console) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from benchmarks.cpu import machine
    from benchmarks.env import BenchEnv
    from benchmarks.scenarios import Run, config_dict, run_scenarios

    started = time.monotonic()
    results: dict[str, Any] = {
        "slotguard_bench": 1,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "slotguard bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]
                                                 if a != "bench"),
        "machine": machine(), "config": config_dict(config), "scenario_names": names,
    }
    env = await asyncio.to_thread(BenchEnv.start, schema=args.schema, shards=args.shards,
                                  keep=args.keep)
    results["servers"] = {"source": env.server_source, "key_prefix": env.settings.key_prefix,
                          "schema": env.settings.db_schema,
                          "redis": redact(env.settings.redis_url),
                          "postgres": redact(env.settings.database_url)}
    console.print(describe_servers(env.settings, env.server_source), markup=False,
                  highlight=False, soft_wrap=True)
    progress = Progress(TextColumn("{task.description:<48}"), BarColumn(), TextColumn(
        "{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=console,
        disable=args.no_progress, transient=False)
    tasks: dict[str, int] = {}

    def on_progress(label: str, fraction: float) -> None:
        if label not in tasks:
            tasks[label] = progress.add_task(label, total=1.0)
        progress.update(tasks[label], completed=fraction)

    run = Run(env, config, on_progress)
    try:
        await env.prepare()
        with progress:
            results["scenarios"] = await run_scenarios(run, names)
    finally:
        from benchmarks.private_scenarios import close_private_stack

        await close_private_stack(run)  # a scenario that failed midway may leave it
        await asyncio.to_thread(run.stop_all)
        results["cleanup"] = await env.close()
        await asyncio.to_thread(env.stop_servers)
    results["machine_end"] = machine()
    from benchmarks.report import issue_targets

    results["targets"] = issue_targets(results)
    results["violations"] = sum(s.get("violations", 0) for s in results["scenarios"].values())
    results["exit_code"] = exit_code(results)
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def exit_code(results: dict[str, Any]) -> int:
    """1 on any verifier violation, 2 when a scenario could not run, else 0."""
    if any(s.get("violations", 0) for s in results["scenarios"].values()):
        return 1
    if any("error" in s for s in results["scenarios"].values()):
        return 2
    return 0


def standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slotguard bench",
                                     description="contention and throughput suite")
    add_arguments(parser)
    return main(parser.parse_args(argv))
