"""Issue 17: one CLI that finds its servers. ``slotguard up`` runs on embedded servers in a
private directory; every other command then runs there with no REDIS_URL/DATABASE_URL and
must use up's servers (through ``.slotguard/env``), say so, and fail in one line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from slotguard import envfile
from tests.timing import eventually

CLI = [sys.executable, "-m", "slotguard"]
UP_TIMEOUT_S = 240  # initdb and two servers on a loaded 2-core machine


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
           and not k.startswith("SLOTGUARD_")}
    env.update(extra)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Up:
    def __init__(self, root: Path, banner: str) -> None:
        self.root = root
        self.banner = banner
        self.url = re.search(r"API\s+(http://127\.0\.0\.1:\d+)", banner).group(1)
        self.redis_url = re.search(r"Redis\s+(\S+)", banner).group(1)
        self.database_url = re.search(r"Postgres\s+(\S+)", banner).group(1)
        self.keys = {role: re.search(rf"{role} key\s+(\S+)", banner).group(1)
                     for role in ("partner", "vendor", "ops")}

    def run(self, *args: str, cwd: Path | None = None, **env: str):
        return subprocess.run([*CLI, *args], cwd=cwd or self.root, env=clean_env(**env),
                              capture_output=True, text=True, timeout=180)

    def get(self, path: str, key: str) -> dict:
        request = urllib.request.Request(f"{self.url}{path}",
                                         headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())


@pytest.fixture(scope="module")
def up():
    root = Path(tempfile.mkdtemp(prefix="slotguard-tools-"))
    log_path = root / "up.log"
    log = log_path.open("w+")
    proc = subprocess.Popen([*CLI, "up", "--port", "0"], cwd=root, env=clean_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        text = ""
        while "Ctrl-C stops everything" not in text:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "slotguard up did not get ready:\n" + text
            time.sleep(0.5)
            text = log_path.read_text()
        yield Up(root, text)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        env_left = (root / ".slotguard" / "env").exists()
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0, "slotguard up did not stop cleanly"
    assert not env_left, "slotguard up left its env file behind"


def test_up_writes_the_env_file_without_keys(up):
    path = up.root / ".slotguard" / "env"
    values = envfile.read(path)
    assert values["REDIS_URL"] == up.redis_url
    assert values["DATABASE_URL"] == up.database_url
    assert values[envfile.API_URL] == up.url
    assert not re.search(r":(6379|5432)\b", up.redis_url + up.database_url)  # embedded
    assert up.banner.count("(embedded, data in ") == 2
    text = path.read_text()
    assert all(key not in text for key in up.keys.values())
    assert "sg_live_" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_commands_use_up_servers_with_no_env_vars(up):
    sub = up.root / "some" / "project"
    sub.mkdir(parents=True)  # the nearest .slotguard/env of a parent directory is found
    done = up.run("keys", "create", "--role", "vendor", "--vendor", "demo-vendor", cwd=sub)
    assert done.returncode == 0, done.stderr
    new_vendor_key = done.stdout.strip().splitlines()[-1]
    assert new_vendor_key.startswith("sg_live_")
    servers_line = done.stderr.strip().splitlines()[0]
    assert up.database_url in servers_line and up.redis_url in servers_line
    assert ".slotguard/env" in servers_line

    done = up.run("vendors", "create", "--id", "second-vendor", "--free", "--instant")
    assert done.returncode == 0, done.stderr
    listed = up.run("vendors", "list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert {"demo-vendor", "second-vendor"} <= set(names)
    partners = up.run("partners", "list")
    assert partners.returncode == 0 and "demo-partner" in partners.stdout

    keys = up.run("keys", "list")
    assert keys.returncode == 0, keys.stderr
    # Prefixes, never a secret: none of the issued keys appears, each one's prefix does.
    for key in [*up.keys.values(), new_vendor_key]:
        assert key not in keys.stdout
        assert key.split("_")[2] in keys.stdout

    # The key made by the CLI works against the API that `up` runs (same Postgres).
    availability = up.get("/v1/vendors/demo-vendor/availability?startTime=2031-01-01T09:00:00Z"
                          "&endTime=2031-01-01T10:00:00Z", new_vendor_key)
    assert availability["vendorId"] == "demo-vendor"


def test_status_reports_a_healthy_deployment(up):
    from yoyo import read_migrations

    from engine.db import MIGRATIONS

    shipped = len(read_migrations(MIGRATIONS))
    done = up.run("status")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{shipped} of {shipped} migrations applied" in done.stdout
    assert "16 of 16 shards ready" in done.stdout
    assert up.database_url in done.stdout and ".slotguard/env" in done.stdout
    report = json.loads(up.run("status", "--json").stdout)
    assert report["healthy"] is True
    assert report["servers"]["DATABASE_URL"] == {"value": up.database_url,
                                                 "source": ".slotguard/env"}
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["api"]["ok"] and checks["api"]["data"]["url"] == up.url
    assert checks["commit queue"]["ok"]


def test_an_environment_variable_wins_and_status_fails_on_it(up):
    dead = "postgresql://postgres@127.0.0.1:9/nowhere"
    done = up.run("status", "--json", DATABASE_URL=dead)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["healthy"] is False
    assert report["servers"]["DATABASE_URL"] == {"value": dead, "source": "DATABASE_URL"}
    assert report["servers"]["REDIS_URL"]["source"] == ".slotguard/env"
    # The schema in the file belongs to the file's Postgres, not to this one.
    assert "SLOTGUARD_DB_SCHEMA" not in report["servers"]
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["postgres"]["ok"] and "unreachable" in checks["postgres"]["summary"]

    done = up.run("keys", "list", DATABASE_URL=dead)
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("slotguard keys list: error: cannot reach Postgres at " + dead)
    assert "(from DATABASE_URL)" in error
    assert "Traceback" not in done.stderr


def test_failures_are_one_line_with_exit_codes(up):
    runtime = up.run("keys", "create", "--role", "partner", "--partner", "nobody")
    assert runtime.returncode == 1
    lines = runtime.stderr.strip().splitlines()
    assert lines[-1] == ("slotguard keys create: error: UNKNOWN_PARTNER: unknown partner "
                         "'nobody'")
    assert len(lines) == 2 and lines[0].startswith("slotguard keys create: servers:")

    for args in (["keys", "create", "--role", "partner"],  # no --partner
                 ["keys", "create", "--role", "root"],
                 ["keys", "revoke"],
                 ["vendors", "create", "--id", "x", "--unit-minutes", "ten"],
                 ["no-such-command"], []):
        usage = up.run(*args)
        assert usage.returncode == 2, (args, usage.stderr)
        error = [line for line in usage.stderr.splitlines() if ": error: " in line]
        assert len(error) == 1 and "--help" in error[0], usage.stderr
        assert "Traceback" not in usage.stderr and "usage:" not in usage.stderr

    debug = up.run("--debug", "keys", "create", "--role", "partner", "--partner", "nobody")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "UnknownPartner" in debug.stderr
    after = up.run("keys", "create", "--role", "partner", "--partner", "nobody", "--debug")
    assert after.returncode == 1 and "Traceback" in after.stderr


async def test_the_banner_walk_reaches_committed(up):
    walk = up.banner.split("(copy and paste):\n", 1)[1].split("\n\n", 1)[0]
    assert "curl" in walk and up.keys["partner"] in walk and up.keys["vendor"] in walk
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", walk + "\necho RID=$RID"],
                          capture_output=True, text=True, timeout=180, env=clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    rid = re.search(r"RID=(rsv_\S+)", done.stdout).group(1)
    steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    # The demo vendor requires payment (issue 12): both authorizations with pm_card_visa.
    assert [s["state"] for s in steps[:4]] == ["AWAITING_VENDOR_AUTH", "AWAITING_REQUESTER_AUTH",
                                               "AUTHORIZED_BOTH", "COMMIT_IN_PROGRESS"]

    async def committed() -> bool:
        reservation = await asyncio.to_thread(up.get, f"/v1/reservations/{rid}",
                                              up.keys["partner"])
        return reservation["state"] == "COMMITTED"

    await eventually(committed, timeout_s=120, what="the walked reservation COMMITTED")


def test_bench_runs_on_up_servers(up):
    out = up.root / "bench.json"
    done = up.run("bench", "--quick", "-s", "hot_slot", "--seconds", "0.4", "--processes", "1",
                  "--connections", "4", "--http-workers", "1", "--no-progress",
                  "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    servers_line = done.stderr.strip().splitlines()[0]
    assert servers_line.startswith("slotguard bench: servers: Redis " + up.redis_url)
    assert f"Postgres {up.database_url} (.slotguard/env)" in servers_line
    results = json.loads(out.read_text())
    # It ran on the servers it was handed, not on the local standard ports or its own.
    assert results["servers"]["source"] == "environment"
    assert results["scenarios"]["hot_slot"]["violations"] == 0
