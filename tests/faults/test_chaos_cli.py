"""``slotguard chaos`` end to end (short: two faults, a 1 s reclaim): one line per fault,
the JSON report, exit 0 without violations; an unknown fault is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "slotguard", "chaos"]


def test_chaos_runs_faults_in_turn_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTGUARD_")}
    env.update(SLOTGUARD_RECLAIM_IDLE_MS="1000", SLOTGUARD_DRAIN_BLOCK_MS="100")
    report = tmp_path / "chaos.json"
    # The readiness target is the 2 s; a loaded test machine gets a wide one here
    # (speed is measured by the command, never asserted by a test).
    done = subprocess.run([*CLI, "--faults", "api-kill,worker-kill", "--seconds", "1",
                           "--ready-target-s", "120", "--report", str(report)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines()
             if line.startswith(("api-kill", "worker-kill"))]
    assert [line.split()[0] for line in lines] == ["api-kill", "worker-kill"]
    assert all(line.endswith("violations 0") for line in lines), done.stdout
    results = json.loads(report.read_text())
    assert [f["fault"] for f in results["faults"]] == ["api-kill", "worker-kill"]
    for fault in results["faults"]:
        assert fault["recovery_s"] is not None and fault["violations"] == []
        assert fault["counts"]["commits_accepted"] >= 5
    assert results["machine"]["cpus"] >= 1


def test_chaos_refuses_an_unknown_fault():
    done = subprocess.run([*CLI, "--faults", "api-kill,meteor"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown fault(s) ['meteor']" in done.stderr
