"""``.slotguard/env``: where ``slotguard up`` tells every other command which servers it runs.

``slotguard up`` writes ``<data dir>/env`` (default ``.slotguard/env``) once its servers
answer: the API URL, ``REDIS_URL``, ``DATABASE_URL`` and the settings that pick the data on
them (schema, key prefix, shard count), plus the pid of the ``up`` process. No key and no
other secret is written (a password inside a URL the user gave stays, as in the banner).
It removes the file again when it stops.

Every other command (``keys``, ``vendors``, ``partners``, ``migrate``, ``bench``,
``status``, ...) resolves its servers variable by variable (:func:`resolve`):

1. the environment variable, when set (``REDIS_URL=... slotguard keys ...``);
2. else the env file: ``$SLOTGUARD_ENV_FILE``, else ``.slotguard/env`` in the working
   directory or the nearest parent that has one; a file whose ``up`` no longer runs is
   ignored (its embedded servers died with it) and the answer says so;
3. else the built-in default (engine/settings.py: the machine's standard local ports).

:meth:`Servers.describe` is the one line a command prints about it.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ENV_FILE_VAR = "SLOTGUARD_ENV_FILE"
FILE_NAME = "env"
DEFAULT_DIR = ".slotguard"
API_URL = "SLOTGUARD_API_URL"
UP_PID = "SLOTGUARD_UP_PID"
# What the file may carry, in the order it is written. Anything else in it is ignored.
SERVER_VARS = (API_URL, "REDIS_URL", "DATABASE_URL")
DATA_VARS = ("SLOTGUARD_DB_SCHEMA", "SLOTGUARD_KEY_PREFIX", "SLOTGUARD_SHARDS",
             # `slotguard up --cluster N` (issue 15): how to talk to the file's Redis
             "SLOTGUARD_REDIS_CLUSTER", "SLOTGUARD_ARQ_REDIS_URL")
KNOWN_VARS = (*SERVER_VARS, *DATA_VARS, UP_PID)
DATA_SERVER = {"SLOTGUARD_DB_SCHEMA": "DATABASE_URL", "SLOTGUARD_KEY_PREFIX": "REDIS_URL",
               "SLOTGUARD_SHARDS": "REDIS_URL", "SLOTGUARD_REDIS_CLUSTER": "REDIS_URL",
               "SLOTGUARD_ARQ_REDIS_URL": "REDIS_URL"}

_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


class EnvFileError(ValueError):
    """The env file cannot be read (a line that is not ``NAME=value``)."""


@dataclass(frozen=True)
class Servers:
    """The servers a command uses and where each came from."""

    values: dict[str, str]  # variable -> value, for every variable that has one
    sources: dict[str, str]  # variable -> "environment" | "env file" | "default"
    env_file: Path | None = None  # the file the values came from, if any did
    ignored: str | None = None  # why an env file that was found was not used
    applied: dict[str, str] = field(default_factory=dict)  # variables taken from the file

    @property
    def redis_url(self) -> str:
        return self.values["REDIS_URL"]

    @property
    def database_url(self) -> str:
        return self.values["DATABASE_URL"]

    @property
    def api_url(self) -> str | None:
        return self.values.get(API_URL)

    def source_of(self, name: str) -> str:
        source = self.sources.get(name, "default")
        if source == "env file" and self.env_file is not None:
            return str(_short(self.env_file))
        if source == "environment":
            return name
        return source

    def describe(self) -> str:
        """One line: each server, and where it came from."""
        parts = [f"Redis {redact(self.redis_url)} ({self.source_of('REDIS_URL')})",
                 f"Postgres {redact(self.database_url)} ({self.source_of('DATABASE_URL')})"]
        if self.api_url:
            parts.append(f"API {self.api_url} ({self.source_of(API_URL)})")
        line = "servers: " + ", ".join(parts)
        if self.ignored:
            line += f"; {self.ignored}"
        return line


def path_for(data_dir: Path | str) -> Path:
    """Where ``slotguard up --data-dir DIR`` writes its env file."""
    return Path(data_dir) / FILE_NAME


def find(environ: dict[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """``$SLOTGUARD_ENV_FILE`` if set (it must exist), else the nearest ``.slotguard/env``."""
    env = os.environ if environ is None else environ
    named = env.get(ENV_FILE_VAR)
    if named:
        path = Path(named)
        if not path.is_file():
            raise EnvFileError(f"{ENV_FILE_VAR}={named}: no such file")
        return path
    here = (cwd or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        candidate = directory / DEFAULT_DIR / FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def read(path: Path) -> dict[str, str]:
    """The file's known variables; blank lines and ``#`` comments are skipped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise EnvFileError(f"{path}:{number}: not a NAME=value line")
        name, value = match.groups()
        if name in KNOWN_VARS:
            values[name] = value
    return values


def write(path: Path, values: dict[str, str], *, pid: int | None = None) -> None:
    """Replace ``path`` atomically (mode 0600) with ``values`` (only the known variables)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by `slotguard up`; removed when it stops. Every slotguard command",
             "# run under this directory uses these servers unless an environment variable",
             "# says otherwise. No API key is stored here."]
    lines += [f"{name}={values[name]}" for name in (*SERVER_VARS, *DATA_VARS) if name in values]
    lines.append(f"{UP_PID}={os.getpid() if pid is None else pid}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".env.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove(path: Path, *, pid: int | None = None) -> None:
    """Remove ``path`` if it is still the file of ``pid`` (default: this process)."""
    try:
        owner = read(path).get(UP_PID)
    except (OSError, EnvFileError):
        return
    if owner == str(os.getpid() if pid is None else pid):
        path.unlink(missing_ok=True)


def resolve(environ: dict[str, str] | None = None, cwd: Path | None = None) -> Servers:
    """The servers a command uses (environment, then env file, then defaults)."""
    from engine.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL

    env = os.environ if environ is None else environ
    path = find(env, cwd)
    from_file: dict[str, str] = {}
    ignored = None
    if path is not None:
        from_file = read(path)
        pid = from_file.get(UP_PID)
        if pid is not None and not _running(pid):
            ignored = (f"{_short(path)} ignored: the `slotguard up` that wrote it "
                       f"(pid {pid}) is not running")
            from_file = {}
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    applied: dict[str, str] = {}
    defaults = {"REDIS_URL": DEFAULT_REDIS_URL, "DATABASE_URL": DEFAULT_DATABASE_URL}
    for name in (*SERVER_VARS, *DATA_VARS):
        # The schema, prefix and shard count in the file describe the file's servers: they
        # follow their server, never another server named in the environment.
        follows = DATA_SERVER.get(name)
        usable = follows is None or sources.get(follows) == "env file"
        if env.get(name):
            values[name], sources[name] = env[name], "environment"
        elif name in from_file and usable:
            values[name] = applied[name] = from_file[name]
            sources[name] = "env file"
        elif name in defaults:
            values[name], sources[name] = defaults[name], "default"
    return Servers(values, sources, env_file=path if applied else None, ignored=ignored,
                   applied=applied)


def apply(environ: dict[str, str] | None = None, cwd: Path | None = None) -> Servers:
    """:func:`resolve`, then put the file's values into ``environ`` (default ``os.environ``)
    so that ``Settings.from_env()`` and child processes see them."""
    env = os.environ if environ is None else environ
    servers = resolve(env, cwd)
    env.update(servers.applied)
    return servers


def redact(url: str) -> str:
    """A URL with its password (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def _running(pid: str) -> bool:
    try:
        number = int(pid)
    except ValueError:
        return False
    try:
        state = Path(f"/proc/{number}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(number, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def _short(path: Path) -> Path:
    """``path`` relative to the working directory when it is under it."""
    try:
        return path.absolute().relative_to(Path.cwd())
    except ValueError:
        return path
