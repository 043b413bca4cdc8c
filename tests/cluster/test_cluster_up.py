"""``slotguard up --cluster 3``: a local 3-master cluster (a replica each) under the data
dir, the API and a worker on it; a reservation is created and read back; Ctrl-C stops
everything, cluster nodes included."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from slotguard.local_cluster import kill_leftovers
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.test_db import drop_schema
from tests.test_up import _default_sigint, _processes_mentioning


def cluster_nodes(data_dir: Path) -> list[str]:
    """The running redis-server processes of the cluster under ``data_dir`` (one directory
    per node, named by its port; redis-server shows ``host:port`` in its title)."""
    ports = [d.name for d in (data_dir / "cluster").iterdir() if d.name.isdigit()]
    return [line for port in ports for line in _processes_mentioning(f"127.0.0.1:{port}")
            if "redis-server" in line]


def test_up_with_a_cluster():
    data_dir = Path(tempfile.mkdtemp(prefix="slotguard-up-cluster-"))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTGUARD_")
           and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(REDIS_URL=REDIS_URL, DATABASE_URL=DATABASE_URL, SLOTGUARD_DB_SCHEMA=schema,
               SLOTGUARD_KEY_PREFIX=f"t{uuid.uuid4().hex[:12]}:")
    log = (data_dir / "up.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "slotguard", "up", "--port", "0",
                             "--cluster", "3", "--data-dir", str(data_dir)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 240
        text = ""
        while "partner key" not in text:
            assert proc.poll() is None, Path(log.name).read_text()[-4000:]
            assert time.monotonic() < deadline, "slotguard up did not get ready:\n" + text
            time.sleep(0.5)
            text = Path(log.name).read_text()
        assert "seed of a Redis Cluster: 3 masters" in text
        url = re.search(r"API\s+(http://127\.0\.0\.1:\d+)", text).group(1)
        key = re.search(r"partner key\s+(\S+)", text).group(1)
        body = {"vendorId": "demo-vendor", "slotStartTime": "2031-03-01T09:00:00Z",
                "slotEndTime": "2031-03-01T10:00:00Z", "requesterId": "alice"}
        request = urllib.request.Request(
            f"{url}/v1/reservations", data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                     "Idempotency-Key": uuid.uuid4().hex})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 201
            rid = json.loads(response.read())["reservationId"]
        read = urllib.request.Request(f"{url}/v1/reservations/{rid}",
                                      headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(read, timeout=30) as response:
            assert json.loads(response.read())["state"] == "AWAITING_VENDOR_CONFIRMATION"
        assert len(cluster_nodes(data_dir)) == 6
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, Path(log.name).read_text()[-3000:]
        assert cluster_nodes(data_dir) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # a clean stop first: it stops the nodes
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kill_leftovers(data_dir / "cluster")
        asyncio.run(drop_schema(schema))
        shutil.rmtree(data_dir, ignore_errors=True)


def test_up_refuses_a_negative_cluster():
    done = subprocess.run([sys.executable, "-m", "slotguard", "up", "--cluster", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--cluster must be >= 1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
