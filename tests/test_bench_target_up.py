"""What a load tester does after ``slotguard up`` (no env vars, embedded servers): aim
``slotguard bench --target`` at the banner's URL with the banner's partner key. The bench
finds the demo vendor's unit through the API and verifies through the API alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_embedded import server_dir  # noqa: F401 (fixture)


def test_bench_target_against_slotguard_up(server_dir):
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("SLOTGUARD_")
           and k != "PROMETHEUS_MULTIPROC_DIR"}
    log = (server_dir / "up.log").open("w+")
    up = subprocess.Popen([sys.executable, "-m", "slotguard", "up", "--port", "0",
                           "--data-dir", str(server_dir / "data")], cwd=server_dir, env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180  # generous: initdb on a loaded machine
        text = ""
        while "partner key" not in text:
            assert up.poll() is None, Path(log.name).read_text()[-4000:]
            assert time.monotonic() < deadline, "slotguard up did not get ready:\n" + text
            time.sleep(0.5)
            text = Path(log.name).read_text()
        url = re.search(r"API\s+(http://127\.0\.0\.1:\d+)", text).group(1)
        key = re.search(r"partner key\s+(\S+)", text).group(1)
        out = server_dir / "target.json"
        bench = subprocess.run(
            [sys.executable, "-m", "slotguard", "bench", "--target", url, "--key", key,
             "--quick", "--seconds", "0.4", "--processes", "1", "--connections", "4",
             "--no-progress", "--json", str(out)],
            cwd=server_dir, env=env, capture_output=True, text=True, timeout=600)
        assert bench.returncode == 0, bench.stderr[-4000:]
        assert f"servers (target, API only): {url}; vendor demo-vendor (given)" in bench.stderr
        assert "unit 15 min" in bench.stderr
        results = json.loads(out.read_text())
        scenario = results["scenarios"]["target"]
        assert results["violations"] == 0 and set(scenario["phases"]) == {"hot", "distinct"}
        assert scenario["verifier"]["created"] > 0
        assert scenario["verifier"]["checked_reservations"] == scenario["verifier"]["created"]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
