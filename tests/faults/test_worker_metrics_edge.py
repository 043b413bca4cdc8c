"""Item 13 (tail) of issue 11: the worker's metrics listen on loopback unless told otherwise
(SLOTGUARD_WORKER_METRICS_HOST), and partner ids reach metric labels only when
SLOTGUARD_METRICS_PARTNER_LABELS allows it (a stable digest otherwise)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from engine.settings import Settings
from jobs.metrics import partner_label
from tests.conftest import REDIS_URL
from tests.faults.edge_servers import clean_shared_redis, cli, env_for, free_port, spawn, stop


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp spells them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(address)
    return found


def test_worker_metrics_bind_loopback_by_default(settings, tmp_path):
    env = env_for(settings, REDIS_URL)
    cli(env, "migrate")
    port = free_port()
    worker = spawn(env, tmp_path / "worker.log", "worker", "--metrics-port", str(port))
    try:
        deadline = time.monotonic() + 60
        while not listening_addresses(port):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "the metrics server did not start"
            time.sleep(0.1)
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only, not 0.0.0.0
    finally:
        stop(worker)
        clean_shared_redis(REDIS_URL, settings.key_prefix)
        subprocess.run(["psql", settings.database_url, "-qc",
                        f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'],
                       capture_output=True, check=False)


def test_partner_labels_are_hashed_unless_allowed():
    assert Settings.from_env({}).worker_metrics_host == "127.0.0.1"
    assert Settings.from_env({}).metrics_partner_labels is False
    hashed = partner_label("acme", plain=False)
    assert hashed != "acme" and "acme" not in hashed
    assert hashed == partner_label("acme", plain=False)  # stable across scrapes
    assert hashed != partner_label("acme2", plain=False)
    assert partner_label("acme", plain=True) == "acme"
    assert partner_label("_other", plain=False) == "_other"  # the fold-in series stays
