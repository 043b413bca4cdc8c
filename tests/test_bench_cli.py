"""``slotguard bench --quick`` end to end on a tiny configuration: every scenario runs, the
JSON is complete with ``violations == 0`` per scenario, and nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import asyncpg
import redis

from benchmarks.cli import exit_code
from benchmarks.scenarios import SCENARIOS
from tests.conftest import DATABASE_URL, REDIS_URL


def test_quick_run_end_to_end_writes_valid_json_and_leaves_nothing(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, REDIS_URL=REDIS_URL, DATABASE_URL=DATABASE_URL)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--seconds", "0.4", "--processes", "1",
         "--connections", "4", "--drain-backlog", "60", "--queue-workers", "1",
         "--http-workers", "1", "--no-progress", "--json", str(out),
         "--report", str(tmp_path / "report")],
        env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.monotonic() - started < 120
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == set(SCENARIOS)
    assert results["violations"] == 0
    for name, scenario in results["scenarios"].items():
        assert "error" not in scenario, (name, scenario.get("error"))
        assert scenario["violations"] == 0, (name, scenario["verifier"])
        assert scenario["verifier"]["checked"]["history_entries"] > 0, name
        for phase, summary in scenario["phases"].items():
            if "throughput_per_s" in summary:
                assert summary["operations"] > 0, (name, phase)
                assert set(summary["latency_ms"]) >= {"p50", "p95", "p99", "p99_9"}
    for name in ("hot_slot", "overlap_storm", "engine_vs_api"):
        assert results["scenarios"][name]["ratio_to_baseline"] is not None, name
    drain = results["scenarios"]["lifecycle"]["phases"]["drain"]
    assert drain["booked"] == drain["committed"] == 60 and drain["audit_rows_complete"]
    assert (tmp_path / "report" / "report.md").exists()
    assert (tmp_path / "report" / "hot_slot-latency-cdf.png").exists()

    # Nothing left: no key of the run's prefix, no schema, no process of ours.
    prefix = results["servers"]["key_prefix"]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert not list(client.scan_iter(match=f"*{prefix}*", count=5000))
    finally:
        client.close()

    async def schema_exists() -> bool:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            return bool(await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1",
                results["servers"]["schema"]))
        finally:
            await conn.close()

    import asyncio

    assert not asyncio.run(schema_exists())
    assert not processes_of_run(prefix)


def processes_of_run(prefix: str) -> list[int]:
    """Live processes started with the run's key prefix (servers, workers, load)."""
    marker = f"SLOTGUARD_KEY_PREFIX={prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_exit_code_is_non_zero_on_any_violation_or_broken_scenario():
    clean = {"scenarios": {"hot_slot": {"violations": 0}, "lifecycle": {"violations": 0}}}
    assert exit_code(clean) == 0
    assert exit_code({"scenarios": {"hot_slot": {"violations": 2},
                                    "lifecycle": {"violations": 0}}}) == 1
    assert exit_code({"scenarios": {"hot_slot": {"violations": 0, "error": "boom"}}}) == 2
