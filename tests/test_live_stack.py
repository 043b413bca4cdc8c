"""The whole stack as operators run it: `slotguard serve --workers 2` and `slotguard worker
--metrics-port` as real processes sharing a Prometheus multiprocess dir. A reservation walks
to COMMITTED; both /metrics scrapes pass `promtool check metrics` and count what happened;
the client's X-Request-Id reaches the audit trail."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest

from jobs.metrics import partner_label
from tests.test_api_fixtures import create_body
from tests.test_cli import CLI, cli_env, free_port, run  # noqa: F401  (fixture)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


def promtool_check(text: str, tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI (apt-get install prometheus)")
        pytest.skip("promtool not installed")
    path = tmp_path / "scrape.txt"
    path.write_text(text)
    done = subprocess.run(f"{promtool} check metrics < {path}", shell=True,
                          capture_output=True, text=True)
    # promtool exits 0 with lint warnings only, 1 on a parse or naming error.
    assert done.returncode == 0, done.stdout + done.stderr


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_live_stack_metrics_and_request_id(cli_env, tmp_path):
    run(cli_env, "migrate")
    run(cli_env, "partners", "create", "--id", "acme")
    run(cli_env, "vendors", "create", "--id", "salon", "--free", "--instant")
    key = run(cli_env, "keys", "create", "--role", "partner", "--partner", "acme"
              ).strip().splitlines()[-1]
    ops_key = run(cli_env, "keys", "create", "--role", "ops").strip().splitlines()[-1]
    multiproc = tmp_path / "metrics"
    multiproc.mkdir()
    env = {**cli_env, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    api_port, worker_port = free_port(), free_port()
    worker = subprocess.Popen([*CLI, "worker", "--metrics-port", str(worker_port),
                               "--metrics-host", "127.0.0.1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    api = subprocess.Popen([*CLI, "serve", "--port", str(api_port), "--workers", "2",
                            "--no-access-log"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{api_port}"
    try:
        wait_http(f"{base}/health/ready", api)
        wait_http(f"http://127.0.0.1:{worker_port}/metrics", worker)
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            r = await client.post("/v1/reservations", json=create_body("salon"),
                                  headers={**auth, "X-Request-Id": "req-live-42"})
            assert r.status_code == 201, r.text
            assert r.headers["x-request-id"] == "req-live-42"
            rid = r.json()["reservationId"]
            r = await client.post(f"/v1/reservations/{rid}/commit", headers=auth)
            assert r.status_code == 202 and r.json()["state"] == "COMMIT_IN_PROGRESS"
            deadline = time.monotonic() + 30
            while (state := (await client.get(f"/v1/reservations/{rid}", headers=auth)
                             ).json()["state"]) != "COMMITTED":
                assert time.monotonic() < deadline, state
                time.sleep(0.1)
            # The audit trail carries the client's request id (once the events drained).
            ops = {"Authorization": f"Bearer {ops_key}"}
            deadline = time.monotonic() + 30
            while True:
                r = await client.get("/v1/ops/audit", params={"reservationId": rid},
                                     headers=ops)
                entries = r.json()["entries"]
                if any(e["action"] == "reservation.committed" for e in entries):
                    break
                assert time.monotonic() < deadline, entries
                time.sleep(0.2)
            first = min(entries, key=lambda e: e["id"])
            assert first["metadata"]["metadata"]["requestId"] == "req-live-42"

            api_scrape = (await client.get("/metrics")).text
        # Partner reputation is published every 10 s by the worker, partner ids hashed
        # (SLOTGUARD_METRICS_PARTNER_LABELS is off by default).
        label = partner_label("acme", plain=False)
        deadline = time.monotonic() + 25
        while True:
            worker_scrape = httpx.get(f"http://127.0.0.1:{worker_port}/metrics").text
            placed = f'slotguard_partner_holds{{outcome="placed",partner="{label}"}}'
            if value(worker_scrape, placed) >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert value(worker_scrape, placed) == 1
        assert value(worker_scrape,
                     f'slotguard_partner_holds{{outcome="committed",partner="{label}"}}') == 1
        assert '"acme"' not in worker_scrape
        for text in (api_scrape, worker_scrape):
            promtool_check(text, tmp_path)
            assert value(text, "slotguard_holds_placed_total") >= 1
            assert value(text, 'slotguard_reservation_transitions_total'
                               '{from_state="COMMIT_IN_PROGRESS",to_state="COMMITTED"}') == 1
    finally:
        for proc in (api, worker):
            proc.terminate()
            proc.wait(timeout=20)
