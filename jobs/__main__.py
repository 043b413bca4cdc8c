"""``python -m jobs [--webhooks inline|off|only]``: the worker, configured from the
environment (as ``slotguard worker``)."""

import argparse
import logging

from engine.settings import Settings
from jobs.worker import WEBHOOK_MODES, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m jobs")
    parser.add_argument("--webhooks", choices=WEBHOOK_MODES, default="inline")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    run(Settings.from_env(), webhooks=args.webhooks)
