"""``python -m jobs``: the worker, configured from the environment (as ``slotguard worker``)."""

import logging

from engine.settings import Settings
from jobs.worker import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run(Settings.from_env())
