"""``slotguard bench``: the contention and throughput suite (benchmarks/cli.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from benchmarks.cli import add_arguments

    bench = subparsers.add_parser(
        "bench", help="contention and throughput scenarios, verified, against baselines",
        description="Run the benchmark scenarios against REDIS_URL/DATABASE_URL (or the local "
                    "standard ports, or embedded servers), verify every one, and report; "
                    "or, with --target URL --key KEY, load a running deployment through its "
                    "API only. Exit 1 on any verifier violation (or missed target with "
                    "--fail-on-target).")
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.cli import main

    return main(args)
