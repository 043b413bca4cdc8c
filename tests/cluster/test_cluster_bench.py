"""The bench verdict on the local Redis Cluster: ``slotguard bench --quick`` (engine, API
and commit-queue scenarios; the baselines and private-Redis scenarios are single-Redis by
nature) finds zero violations, and leaves no key of its run behind on any node."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis
from redis.cluster import RedisCluster

from tests.conftest import DATABASE_URL, REDIS_URL

SCENARIOS = "hot_slot,overlap_storm,lifecycle,engine_vs_api"


def test_quick_bench_on_the_cluster_finds_no_violation(redis_cluster, tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, REDIS_URL=redis_cluster.seed_url, DATABASE_URL=DATABASE_URL,
               SLOTGUARD_REDIS_CLUSTER="true", SLOTGUARD_ARQ_REDIS_URL=REDIS_URL)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--seconds", "0.5", "--processes", "1",
         "--connections", "8", "--drain-backlog", "100", "--queue-workers", "1",
         "--http-workers", "1", "-s", SCENARIOS, "--no-progress", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["violations"] == 0
    for name in SCENARIOS.split(","):
        scenario = results["scenarios"][name]
        assert "error" not in scenario, (name, scenario.get("error"))
        assert scenario["violations"] == 0, (name, scenario["verifier"])
        assert scenario["verifier"]["checked"]["history_entries"] > 0, name
    drain = results["scenarios"]["lifecycle"]["phases"]["drain"]
    assert drain["booked"] == drain["committed"] == 100 and drain["audit_rows_complete"]
    prefix = results["servers"]["key_prefix"]
    client = RedisCluster.from_url(redis_cluster.seed_url)
    try:
        assert not list(client.scan_iter(match=f"*{prefix}*", count=5000))
    finally:
        client.close()
    single = redis.Redis.from_url(REDIS_URL)  # arq's cron bookkeeping went here
    try:
        assert not list(single.scan_iter(match=f"*{prefix}*", count=5000))
    finally:
        single.close()
