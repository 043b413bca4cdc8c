"""``slotguard bench --target URL --key KEY`` against a live API (uvicorn + a commit-queue
worker on the shared Redis/Postgres under the test's prefix and schema), the API-only
verifier's double-booking check, and the run's end: full-width tables in a log, missed
targets listed, ``--fail-on-target``. Speed is never asserted."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from api import schemas
from benchmarks.cli import finish
from benchmarks.report import missed_targets
from benchmarks.target import double_bookings
from tests import live_server

CLI = [sys.executable, "-m", "slotguard"]
SMALL = ["--quick", "--seconds", "0.5", "--processes", "1", "--connections", "4",
         "--no-progress"]


@pytest.fixture(scope="module")
def live():
    api = live_server.start(workers=1)
    yield api
    live_server.stop(api)


def bench(live, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = Path(tempfile.mkdtemp(prefix="slotguard-target-")) / "r.json"
    proc = subprocess.run([*CLI, "bench", "--target", live.url, *SMALL, "--json", str(out),
                           *args], env=live.env, capture_output=True, text=True, timeout=600)
    results = json.loads(out.read_text()) if out.exists() else {}
    return proc, results


def test_target_with_a_vendor_key_walks_and_verifies_through_the_api(live):
    proc, results = bench(live, "--key", live.key("p1"), "--vendor", "v-confirm",
                          "--vendor-key", live.key("vendor"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"servers (target, API only): {live.url}; vendor v-confirm" in proc.stderr
    assert results["mode"] == "target" and results["violations"] == 0
    scenario = results["scenarios"]["target"]
    assert set(scenario["phases"]) == {"hot", "distinct", "walk"}
    assert all(p["operations"] > 0 for p in scenario["phases"].values())
    hot = scenario["phases"]["hot"]
    assert hot["outcomes"].get("ok", 0) + hot["outcomes"].get("conflict", 0) \
        == hot["operations"]  # every answer a decision (no error)
    verifier = scenario["verifier"]
    assert verifier["checked_reservations"] == verifier["created"] > 0
    assert verifier["commits_accepted"] > 0
    # The worker drained the walk's commits: read back through the API as COMMITTED.
    assert verifier["commit_final_states"].get("COMMITTED", 0) == verifier["commits_accepted"]
    assert "timeline_per_100ms" in hot and len(hot["timeline_per_100ms"]) >= 3
    assert "missed targets" in proc.stderr
    assert live.key("p1") not in proc.stderr and live.key("p1") not in json.dumps(results)


def test_target_with_an_admin_key_uses_a_vendor_of_its_own(live):
    proc, results = bench(live, "--key", live.key("p1"), "--admin-key", live.key("admin"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    servers = results["servers"]
    assert servers["vendor"].startswith("bench-") and len(servers["resources"]) == 4
    phases = results["scenarios"]["target"]["phases"]
    assert phases["walk"]["workload"] == "http_create_commit"
    assert results["scenarios"]["target"]["verifier"]["commits_accepted"] > 0


def test_target_without_a_vendor_key_skips_the_walk_and_refuses_bad_input(live):
    proc, results = bench(live, "--key", live.key("p2"), "--vendor", "v-confirm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scenario = results["scenarios"]["target"]
    assert set(scenario["phases"]) == {"hot", "distinct"}
    assert any("walk skipped" in n for n in scenario["notes"])
    bad = subprocess.run([*CLI, "bench", "--target", "ftp://x", "--key", "k"], env=live.env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "http://" in bad.stderr
    nokey = subprocess.run([*CLI, "bench", "--target", live.url], env=live.env,
                           capture_output=True, text=True, timeout=120)
    assert nokey.returncode != 0 and "--key" in nokey.stderr
    unknown = subprocess.run([*CLI, "bench", "--target", live.url, "--key", live.key("p1"),
                              "--vendor", "no-such-vendor", *SMALL], env=live.env,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "no-such-vendor" in unknown.stderr


def _read(rid, resource, start, end, *transitions):
    history = [schemas.StateTransition(id=f"{rid}-{i}", reservation_id=rid, from_state=None,
                                       to_state=state, triggered_by="partner", reason=None,
                                       metadata=None, timestamp=at, idempotency_key=None,
                                       version=i)
               for i, (state, at) in enumerate(transitions)]
    return schemas.Reservation(
        reservation_id=rid, state=transitions[-1][0], vendor_id="v", resource_id=resource,
        slot_start_time=start, slot_end_time=end, requester_id="r",
        created_at=transitions[0][1], expires_at=end, version=len(transitions), metadata={},
        state_history=history, booking_id=None, failure_reason=None)


def test_double_booking_check_finds_overlapping_live_windows_only():
    s, e = "2030-01-01T09:00:00Z", "2030-01-01T09:30:00Z"
    reads = {
        # a after b's cancel: fine; c live while a is live on an overlapping slot: double.
        "b": _read("b", "r1", s, e, ("HELD", "2030-01-01T00:00:00Z"),
                   ("CANCELLED", "2030-01-01T00:00:01Z")),
        "a": _read("a", "r1", s, e, ("HELD", "2030-01-01T00:00:01Z")),
        "c": _read("c", "r1", "2030-01-01T09:15:00Z", "2030-01-01T09:45:00Z",
                   ("HELD", "2030-01-01T00:00:05Z"), ("COMMITTED", "2030-01-01T00:00:06Z")),
        # another resource, and a touching slot: never a conflict.
        "d": _read("d", "r2", s, e, ("HELD", "2030-01-01T00:00:05Z")),
        "f": _read("f", "r1", "2030-01-01T09:45:00Z", "2030-01-01T10:00:00Z",
                   ("HELD", "2030-01-01T00:00:05Z")),
    }
    found = double_bookings(reads, {"r1": 900_000, "r2": 900_000})
    assert [sorted(v["ids"]) for v in found] == [["a", "c"]]
    del reads["c"]
    assert double_bookings(reads, {"r1": 900_000, "r2": 900_000}) == []


def _results(met: bool | None, violations: int = 0) -> dict:
    long_name = "a target whose name is far longer than eighty columns, " * 2
    return {"scenarios": {"s": {"phases": {}, "violations": violations, "targets": [
                {"target": "scenario bound", "value": 3, "bound": 5, "direction": ">=",
                 "met": met}]}},
            "targets": [{"target": long_name.strip(), "measured": "x", "value": 1.0,
                         "bound": 2.0, "direction": ">=", "ratio_to_bound": 0.5,
                         "met": met}],
            "violations": violations, "exit_code": 1 if violations else 0, "seconds": 1.0}


@pytest.mark.parametrize("flag,met,code", [(False, False, 0), (True, False, 1),
                                            (True, True, 0), (True, None, 0)])
def test_missed_targets_are_listed_and_fail_on_target_exits_1(flag, met, code):
    buffer = io.StringIO()
    console = Console(file=buffer, width=80)  # not a terminal: a log
    args = argparse.Namespace(json=None, report=None, fail_on_target=flag)
    assert finish(args, _results(met), console) == code
    text = buffer.getvalue()
    missed = missed_targets(_results(met))
    assert len(missed) == (2 if met is False else 0)
    if met is False:
        assert f"missed targets ({len(missed)}):" in text
        assert "s: scenario bound: 3 (bound >= 5)" in text
    else:
        assert "missed targets: none" in text
    # The targets table is whole in a log: the long target name is on one line.
    assert max(len(line) for line in text.splitlines()) > 80
    assert "a target whose name is far longer than eighty columns, a target" in text
