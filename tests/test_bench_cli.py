"""``slotguard bench --quick`` end to end on a tiny configuration: every scenario runs, the
JSON is complete with ``violations == 0`` per scenario, and nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg
import redis

from benchmarks.cli import exit_code
from benchmarks.scenarios import SCENARIOS
from tests.conftest import DATABASE_URL, REDIS_URL


def test_quick_run_end_to_end_writes_valid_json_and_leaves_nothing(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, REDIS_URL=REDIS_URL, DATABASE_URL=DATABASE_URL)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--seconds", "0.4", "--processes", "1",
         "--connections", "4", "--drain-backlog", "60", "--queue-workers", "1",
         "--http-workers", "1", "--scale-sizes", "100,300", "--scale-bookings", "400",
         "--no-progress", "--json", str(out), "--report", str(tmp_path / "report")],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
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
    check_issue_10_outputs(results, tmp_path / "report")
    # Issue 17: the console names the servers; missed targets are listed at the end; a
    # 0.4 s phase has a throughput curve per 100 ms.
    assert f"servers (environment): redis {REDIS_URL}" in proc.stderr
    assert any(line.startswith("missed targets") for line in proc.stderr.splitlines())
    hot = results["scenarios"]["hot_slot"]["phases"]["api"]
    assert len(hot["timeline_per_100ms"]) >= 3

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
    results["servers"]["schema"] += "_pgep"  # the pg_endpoint baseline's own schema
    assert not asyncio.run(schema_exists())
    assert not processes_of_run(prefix)


def check_issue_10_outputs(results, report_dir):
    """pg_endpoint, redis_cost, scale and the targets table are there and well-formed
    (values are whatever this machine measured: only their shape is checked)."""
    scenarios = results["scenarios"]
    for name in ("hot_slot", "engine_vs_api"):
        phase = scenarios[name]["phases"]["pg_endpoint"]
        assert phase["operations"] > 0 and phase["outcomes"].get("error", 0) == 0, phase
        assert scenarios[name]["ratios"]["api_to_pg_endpoint"] > 0
        assert phase["server_cpu_us_per_op"] > 0
    assert scenarios["hot_slot"]["phases"]["pg_endpoint"]["conflict_rate"] > 0

    cost = scenarios["redis_cost"]
    assert set(cost["redis_cpu_us"]) == {"create", "conflict", "engine_place"}
    assert all(v and v > 0 for v in cost["redis_cpu_us"].values()), cost["redis_cpu_us"]
    assert cost["ratios"]["create_to_engine_place"] > 0
    for kind, counted in (("create", "ok"), ("conflict", "conflict"), ("engine_place", "ok")):
        split = cost["by_script"][kind]
        assert split["counted"] > 0 and split["outcomes"].get(counted) == split["counted"]
        assert split["round_trips_per_request"] >= 1, split
        scripts = {k: v for k, v in split["by_script"].items() if k.startswith("evalsha ")}
        assert scripts and all(v["calls_per_op"] > 0 and v["us_per_call"] > 0
                               for v in scripts.values()), split["by_script"]
        assert not any(len(k.split()[1]) == 12 for k in scripts), "a SHA not mapped to a name"
    for kind in ("create", "conflict"):
        per = cost["phases"][kind]["per_request"]
        assert per["counted"] > 0 and per["redis_cpu_us_per_op"] > 0
        assert cost["api_worker_cpu_us_per_request"][kind] > 0

    scale = scenarios["scale"]
    assert [p["live_reservations"] for p in scale["points"]] == [100, 300]
    for point in scale["points"]:
        assert point["bytes_per_live_reservation"] > 0
        assert point["engine_per_s"] > 0 and point["api_per_s"] > 0
    assert [d["bookings_in_table_before"] for d in scale["drains"]] == [400]
    assert scale["drains"][0]["audit_rows_complete"]
    for plot in ("scale-throughput.png", "scale-memory.png", "scale-drain.png"):
        assert (report_dir / plot).stat().st_size > 0

    targets = results["targets"]
    assert len(targets) == 11
    for row in targets:
        assert row["value"] is not None, row
        assert row["met"] is (row["value"] >= row["bound"] if row["direction"] == ">="
                              else row["value"] <= row["bound"]), row
    assert "Issue 10 targets" in (report_dir / "report.md").read_text()


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


def test_issue_targets_verdicts_follow_the_measured_values():
    """The targets table marks each issue-10 target met, MISSED or not measured from the
    values of the run (synthetic results: the verdict logic, not a speed)."""
    from benchmarks.report import issue_targets

    def phase(rate, p99=10.0):
        return {"throughput_per_s": rate, "latency_ms": {"p99": p99}}

    results = {
        "config": {"processes": 2, "concurrency": 32},
        "scenarios": {
            "engine_vs_api": {"phases": {"api": phase(2000, p99=30.0),
                                         "minimal_endpoint": phase(1000),
                                         "pg_endpoint": phase(4000)},
                              "ratios": {"api_to_minimal_endpoint": 2.0,
                                         "api_to_pg_endpoint": 0.5}},
            "hot_slot": {"phases": {"api": phase(3000), "pg_endpoint": phase(2000)},
                         "ratios": {"api_to_pg_endpoint": 1.5}},
            "redis_cost": {"ratios": {"create_to_engine_place": 3.2,
                                      "conflict_to_engine_place": 1.5},
                           "redis_cpu_us": {"create": 32, "conflict": 15,
                                            "engine_place": 10}},
            "lifecycle": {"phases": {"drain": {"bookings_with_audit_per_s": 6000,
                                               "audit_rows_complete": False}}},
            "scale": {"points": [{"live_reservations": 1000, "bytes_per_live_reservation": 900,
                                  "engine_per_s": 100, "api_per_s": 100},
                                 {"live_reservations": 10**6,
                                  "bytes_per_live_reservation": 1024.0,
                                  "engine_per_s": 79, "api_per_s": 80}],
                      "drains": [{"bookings_in_table_before": 10**6,
                                  "bookings_with_audit_per_s": 3000,
                                  "audit_rows_complete": True}]},
        },
    }
    verdicts = {row["target"].split(" (this run")[0]: row["met"]
                for row in issue_targets(results)}
    assert list(verdicts.values()) == [
        True,  # 2.0x the minimal endpoint
        True,  # exactly 1.5x pg_endpoint on the hot slot
        False,  # 0.5x pg_endpoint on distinct slots
        False,  # 3.2x the engine's Redis CPU
        True,  # exactly 1.5x for a conflict
        False,  # p99 30 ms
        False,  # fast, but the audit rows were not complete
        True,  # exactly 3,000/s with 10^6 bookings
        True,  # exactly 1 KiB
        True,  # API kept 80 %
        False,  # engine kept 79 %
    ], verdicts
    empty = issue_targets({"config": {}, "scenarios": {}})
    assert len(empty) == 11 and all(row["met"] is None for row in empty)


def test_slow_log_split_counts_commands_inside_a_script_under_that_script():
    from benchmarks.private_scenarios import split_by_script

    log = [  # newest first, as SLOWLOG GET answers
        {"id": 6, "duration": 3, "command": "GET k", "client_address": "127.0.0.1:5"},
        {"id": 5, "duration": 50, "command": "EVALSHA bbb 1 k", "client_address": "127.0.0.1:5"},
        {"id": 4, "duration": 4, "command": "XADD s * a b", "client_address": "?:0"},
        {"id": 3, "duration": 40, "command": "EVALSHA aaa 1 k", "client_address": "127.0.0.1:5"},
        {"id": 2, "duration": 5, "command": "HSET h a b", "client_address": "?:0"},
        {"id": 1, "duration": 5, "command": "HSET h c d", "client_address": "?:0"},
        {"id": 0, "duration": 9, "command": "INFO all", "client_address": "127.0.0.1:6"},
    ]
    split = split_by_script(log, 2, {"aaa": "create", "bbb": "complete"})
    assert split == {
        "evalsha complete": {"calls_per_op": 0.5, "us_per_op": 25.0, "us_per_call": 50.0,
                             "commands_inside_per_call": {"xadd": 1.0}},
        "evalsha create": {"calls_per_op": 0.5, "us_per_op": 20.0, "us_per_call": 40.0,
                           "commands_inside_per_call": {"hset": 2.0}},
        "get": {"calls_per_op": 0.5, "us_per_op": 1.5, "us_per_call": 3.0},
    }
    assert split_by_script(log, 0, {}) == {}
