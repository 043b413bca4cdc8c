"""``slotguard chaos``, issue 15's faults in their short CI form (bounded, generous timeouts,
no speed asserted): CLIENT PAUSE, a network stall through our proxy and a worker SIGSTOPped
past the reclaim on a single Redis; on a local 3-master cluster with replicas, a master
killed with its replica promoted, CLIENT PAUSE, a master ``SHUTDOWN NOSAVE`` and started
again (it must rejoin as a replica) and a stall of every node's proxy. Each line: kind,
recovery, 0 violations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "slotguard", "chaos"]


def chaos(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTGUARD_")}
    env.update(SLOTGUARD_RECLAIM_IDLE_MS="1000", SLOTGUARD_DRAIN_BLOCK_MS="100")
    report = tmp_path / "chaos.json"
    done = subprocess.run([*CLI, *args, "--seconds", "3", "--ready-target-s", "120",
                           "--report", str(report)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(report.read_text())


def check_lines(done, results, faults: list[str]) -> None:
    lines = [line for line in done.stdout.splitlines() if line.startswith(tuple(faults))]
    assert [line.split()[0] for line in lines] == faults
    assert all(line.endswith("violations 0") for line in lines), done.stdout
    assert [f["fault"] for f in results["faults"]] == faults
    for fault in results["faults"]:
        assert fault["recovery_s"] is not None and fault["violations"] == []
        assert fault["counts"]["commits_accepted"] >= 5


def test_pause_stall_and_stopped_worker_on_a_single_redis(tmp_path):
    faults = ["client-pause", "network-stall", "worker-stop"]
    done, results = chaos(tmp_path, "--faults", ",".join(faults))
    check_lines(done, results, faults)


def test_master_failover_and_pause_on_a_cluster(tmp_path):
    faults = ["cluster-failover", "client-pause"]
    done, results = chaos(tmp_path, "--cluster", "3", "--faults", ",".join(faults))
    check_lines(done, results, faults)


def test_master_shutdown_nosave_and_network_stall_on_a_cluster(tmp_path):
    faults = ["redis-restart", "network-stall"]
    done, results = chaos(tmp_path, "--cluster", "3", "--faults", ",".join(faults))
    check_lines(done, results, faults)
    restart, stall = results["faults"]
    # The node came back empty and rejoined as a replica of the promoted one.
    assert restart["notes"]["rejoined_as"] == "slave"
    assert restart["notes"]["promoted_after_s"] >= restart["notes"]["shutdown_s"]
    # The API, workers and replicas reached the nodes through the proxies that stalled.
    assert stall["notes"]["proxied_connections"] >= 6


def test_faults_that_do_not_fit_the_topology_are_refused():
    for args, says in ((["--faults", "cluster-failover"], "--cluster N"),
                       (["--rounds", "0"], "--rounds >= 1")):
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
