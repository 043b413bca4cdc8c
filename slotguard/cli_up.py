"""``slotguard up [--port N] [--cluster N]``: embedded servers (unless REDIS_URL/DATABASE_URL are set),
migrations, a demo vendor and partner key, the API and a worker; Ctrl-C stops it all."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="run everything locally, embedded servers included")
    up.add_argument("--port", type=int, default=None,
                    help="API port (default 8000, or a free one if 8000 is taken)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--data-dir", type=Path, default=Path(".slotguard"),
                    help="where the embedded servers keep their data")
    up.add_argument("--cluster", type=int, default=0, metavar="N",
                    help="run the hot path on a local Redis Cluster of N masters (a replica "
                         "each); the single Redis keeps arq's cron queue")
    up.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    import sys

    from slotguard.up import run

    if args.cluster < 0:
        print("error: --cluster must be >= 1 (0: no cluster)", file=sys.stderr)
        return 2
    return run(args.host, args.port, args.data_dir, args.cluster)
