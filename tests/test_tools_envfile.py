"""Issue 17: how a command picks its servers (slotguard/envfile.py), without servers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from engine.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL
from slotguard import envfile


@pytest.fixture
def root():
    path = Path(tempfile.mkdtemp(prefix="slotguard-envfile-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_file(root: Path, pid: int | None = None, **values: str) -> Path:
    path = envfile.path_for(root / ".slotguard")
    envfile.write(path, {"REDIS_URL": "redis://127.0.0.1:1111/0",
                         "DATABASE_URL": "postgresql://postgres@127.0.0.1:2222/slotguard",
                         "SLOTGUARD_DB_SCHEMA": "up_schema", **values}, pid=pid)
    return path


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_without_a_file_the_defaults_are_named(root):
    servers = envfile.resolve({}, cwd=root)
    assert (servers.redis_url, servers.database_url) == (DEFAULT_REDIS_URL,
                                                         DEFAULT_DATABASE_URL)
    assert servers.sources == {"REDIS_URL": "default", "DATABASE_URL": "default"}
    assert "(default)" in servers.describe()


def test_the_file_of_a_running_up_is_used_below_its_directory(root):
    path = write_file(root)  # this process stands in for `up`
    nested = root / "a" / "b"
    nested.mkdir(parents=True)
    environ: dict[str, str] = {}
    servers = envfile.apply(environ, cwd=nested)
    assert servers.env_file == path
    assert environ == {"REDIS_URL": "redis://127.0.0.1:1111/0",
                       "DATABASE_URL": "postgresql://postgres@127.0.0.1:2222/slotguard",
                       "SLOTGUARD_DB_SCHEMA": "up_schema"}
    assert servers.describe().count(str(path)) == 2


def test_environment_wins_variable_by_variable(root):
    write_file(root, SLOTGUARD_KEY_PREFIX="up:")
    environ = {"DATABASE_URL": "postgresql://me@db.example/prod"}
    servers = envfile.apply(environ, cwd=root)
    assert servers.database_url == "postgresql://me@db.example/prod"
    assert servers.source_of("DATABASE_URL") == "DATABASE_URL"
    assert servers.redis_url == "redis://127.0.0.1:1111/0"
    # The file's schema follows the file's Postgres; its prefix follows its Redis.
    assert "SLOTGUARD_DB_SCHEMA" not in environ
    assert environ["SLOTGUARD_KEY_PREFIX"] == "up:"


def test_a_file_left_by_a_dead_up_is_ignored_and_said_so(root):
    pid = dead_pid()
    write_file(root, pid=pid)
    environ: dict[str, str] = {}
    servers = envfile.apply(environ, cwd=root)
    assert environ == {}
    assert servers.redis_url == DEFAULT_REDIS_URL
    assert f"(pid {pid}) is not running" in servers.describe()


def test_named_file_must_exist_and_lines_must_parse(root):
    with pytest.raises(envfile.EnvFileError, match="no such file"):
        envfile.find({envfile.ENV_FILE_VAR: str(root / "missing")})
    bad = root / "env"
    bad.write_text("REDIS_URL=redis://x\nthis is not a line\n")
    with pytest.raises(envfile.EnvFileError, match=":2: not a NAME=value line"):
        envfile.resolve({envfile.ENV_FILE_VAR: str(bad)})


def test_remove_only_removes_its_own_file(root):
    path = write_file(root, pid=os.getpid() + 1_000_000)
    envfile.remove(path)
    assert path.exists()
    path = write_file(root)
    envfile.remove(path)
    assert not path.exists()


def test_passwords_are_redacted():
    assert envfile.redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert envfile.redact("redis://h:6379/0") == "redis://h:6379/0"


def test_cluster_settings_travel_with_their_redis(root):
    write_file(root, SLOTGUARD_REDIS_CLUSTER="true",
               SLOTGUARD_ARQ_REDIS_URL="redis://127.0.0.1:3333/0")
    environ: dict[str, str] = {}
    envfile.apply(environ, cwd=root)
    assert environ["SLOTGUARD_REDIS_CLUSTER"] == "true"
    assert environ["SLOTGUARD_ARQ_REDIS_URL"] == "redis://127.0.0.1:3333/0"
    # Another Redis named in the environment: the file's cluster settings are not its own.
    environ = {"REDIS_URL": "redis://elsewhere:6379/0"}
    envfile.apply(environ, cwd=root)
    assert "SLOTGUARD_REDIS_CLUSTER" not in environ
    assert "SLOTGUARD_ARQ_REDIS_URL" not in environ
