"""``python -m benchmarks``: the same as ``slotguard bench``."""

from benchmarks.cli import standalone

if __name__ == "__main__":
    raise SystemExit(standalone())
