"""The README's first command on a fresh machine: `slotguard up` from a fresh virtualenv
with REDIS_URL and DATABASE_URL unset, embedded servers, one reservation, a clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.test_embedded import server_dir  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_slotguard_up_in_a_fresh_virtualenv(server_dir):
    venv = server_dir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True,
                   timeout=600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("SLOTGUARD_")
           and k != "PROMETHEUS_MULTIPROC_DIR"}
    data_dir = server_dir / "data"
    log = (server_dir / "up.log").open("w+")
    proc = subprocess.Popen([str(venv / "bin" / "slotguard"), "up", "--port", "0",
                             "--data-dir", str(data_dir)], cwd=server_dir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # Ctrl-C on a terminal reaches a process whose SIGINT is at its
                            # default; a harness that runs the suite in the background
                            # without job control has it ignored, and a Python child would
                            # inherit that and never see the SIGINT below.
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 180  # generous: initdb on a loaded machine
        text = ""
        while "Ctrl-C stops everything" not in text:
            assert proc.poll() is None, Path(log.name).read_text()[-4000:]
            assert time.monotonic() < deadline, "slotguard up did not get ready:\n" + text
            time.sleep(0.5)
            text = Path(log.name).read_text()
        url = re.search(r"API\s+(http://127\.0\.0\.1:\d+)", text).group(1)
        key = re.search(r"partner key\s+(\S+)", text).group(1)
        assert re.search(r"Redis\s+redis://127\.0\.0\.1:(\d+)", text).group(1) != "6379"
        assert len(_processes_mentioning(str(data_dir))) >= 2  # embedded Redis and Postgres

        with urllib.request.urlopen(f"{url}/health/ready", timeout=60) as response:
            assert response.status == 200
            assert json.loads(response.read())["status"] == "ready"
        request = urllib.request.Request(
            f"{url}/v1/reservations", method="POST",
            data=json.dumps({"vendorId": "demo-vendor", "requesterId": "alice",
                             "slotStartTime": "2030-01-01T09:00:00Z",
                             "slotEndTime": "2030-01-01T10:00:00Z"}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 201
            created = json.loads(response.read())
        assert created["state"] == "AWAITING_VENDOR_CONFIRMATION"
        assert created["reservationId"].startswith("rsv_")
        # The demo vendor requires payment (issue 12): walked to COMMITTED through the
        # localstripe `up` started, with the test card the banner names.
        assert "localstripe" in text and "pm_card_visa" in text
        vendor_key = re.search(r"vendor key\s+(\S+)", text).group(1)
        rid = created["reservationId"]

        def post(action: str, key: str, body: dict | None = None) -> dict:
            req = urllib.request.Request(
                f"{url}/v1/reservations/{rid}/{action}", method="POST",
                data=json.dumps(body or {}).encode(),
                headers={"Authorization": f"Bearer {key}",
                         "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as response:
                return json.loads(response.read())

        assert post("vendor-confirmation", vendor_key)["state"] == "AWAITING_VENDOR_AUTH"
        assert post("vendor-authorization", vendor_key,
                    {"paymentMethodId": "pm_card_visa"})["state"] == "AWAITING_REQUESTER_AUTH"
        assert post("requester-authorization", key,
                    {"paymentMethodId": "pm_card_visa"})["state"] == "AUTHORIZED_BOTH"
        assert post("commit", key)["state"] == "COMMIT_IN_PROGRESS"
        deadline = time.monotonic() + 120
        while True:
            req = urllib.request.Request(f"{url}/v1/reservations/{rid}",
                                         headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=60) as response:
                body = json.loads(response.read())
            if body["state"] == "COMMITTED":
                break
            assert body["state"] == "COMMIT_IN_PROGRESS", body
            assert time.monotonic() < deadline, "the paid commit did not finish"
            time.sleep(0.2)
        assert body["paymentState"]["requesterPaymentIntentStatus"] == "succeeded"
        assert body["paymentState"]["vendorPaymentIntentStatus"] == "succeeded"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            # Generous: `up` itself gives each child 20 s and each server 30 s to stop.
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole tree: API, worker, servers
            proc.wait()
            raise AssertionError("slotguard up did not stop:\n"
                                 + Path(log.name).read_text()[-4000:]) from None
    assert code == 0, Path(log.name).read_text()[-4000:]
    assert "slotguard: stopping" in Path(log.name).read_text()
    # The embedded servers are gone too (waited for, with a generous bound).
    deadline = time.monotonic() + 60
    while (left := _processes_mentioning(str(data_dir))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
    # localstripe (started with the data dir as its working directory) is gone too.
    def in_data_dir() -> list[str]:
        found = []
        for proc_dir in Path("/proc").iterdir():
            try:
                if proc_dir.name.isdigit() and \
                        Path(os.readlink(proc_dir / "cwd")) == data_dir.resolve():
                    found.append(proc_dir.name)
            except OSError:
                continue
        return found

    deadline = time.monotonic() + 60
    while (left := in_data_dir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
