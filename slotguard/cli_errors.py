"""How the ``slotguard`` command fails: one clear line on stderr and a non-zero exit.

- Usage errors (argparse, or :class:`UsageError` from a command): exit 2, the line ends with
  a pointer to ``--help``.
- Runtime failures: exit 1, the line says what failed and, where it is a server, which one
  and where its address came from (``.slotguard/env``, an environment variable, the
  default): an unreachable Postgres, a schema that was never migrated, an engine error's
  code and message.
- Ctrl-C: exit 130.

A traceback only with ``--debug`` (anywhere on the command line) or ``SLOTGUARD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from slotguard.envfile import Servers, redact

USAGE_EXIT = 2
RUNTIME_EXIT = 1
INTERRUPTED_EXIT = 130
DEBUG_FLAG = "--debug"


class UsageError(Exception):
    """A command line that parses but makes no sense (exit 2)."""


class CommandError(Exception):
    """A runtime failure whose message is already the one line to print (exit 1)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line with a pointer to ``--help``.
    Sub-parsers inherit the class (argparse creates them with ``type(parent)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("SLOTGUARD_DEBUG", "") in ("1", "true", "yes")


def strip_debug(argv: list[str]) -> list[str]:
    """The arguments without ``--debug`` (accepted before or after the subcommand)."""
    return [arg for arg in argv if arg != DEBUG_FLAG]


def run(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
        prog: str, debug: bool, servers: Servers | None = None) -> int:
    """``func(args)``; any exception becomes one line on stderr and an exit code."""
    try:
        return int(func(args) or 0)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # SystemExit("message"): a command's usage refusal
            if debug:
                raise
            return fail(prog, exc.code, USAGE_EXIT)
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        return fail(prog, "interrupted", INTERRUPTED_EXIT)
    except Exception as exc:  # noqa: BLE001 (the whole point: no traceback for users)
        if debug:
            raise
        code = USAGE_EXIT if isinstance(exc, UsageError) else RUNTIME_EXIT
        message = describe(exc, servers)
        if code == USAGE_EXIT:
            message += f" (see `{prog} --help`)"
        return fail(prog, message, code)


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return code


def one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    return lines[0] + (" (...)" if len(lines) > 1 else "")


def describe(exc: BaseException, servers: Servers | None) -> str:
    """The one line for an exception a command let through."""
    from engine.errors import EngineError
    from engine.settings import SettingsError

    if isinstance(exc, (UsageError, CommandError)):
        return str(exc)
    if isinstance(exc, EngineError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, SettingsError):
        return f"bad setting: {exc}"
    kind = _server_of(exc)
    if kind == "postgres":
        return _postgres_problem(exc, servers)
    if kind == "redis":
        where = _where(servers, "REDIS_URL")
        return f"cannot use Redis{where}: {_reason(exc)}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    name = type(exc).__name__
    text = one_line(str(exc)) if str(exc).strip() else name
    return f"{text if name in text else name + ': ' + text} (`--debug` shows the traceback)"


def _postgres_problem(exc: BaseException, servers: Servers | None) -> str:
    where = _where(servers, "DATABASE_URL")
    name = type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if sqlstate is None and getattr(exc, "diag", None) is not None:
        sqlstate = exc.diag.sqlstate
    schema = (servers.values.get("SLOTGUARD_DB_SCHEMA") if servers else None) or "slotguard"
    if sqlstate == "42P01" or name in ("UndefinedTableError", "UndefinedTable"):
        return (f"Postgres{where} has no slotguard tables in schema {schema!r}: run "
                f"`slotguard migrate` (or `slotguard up`) first")
    if sqlstate == "3D000" or name in ("InvalidCatalogNameError", "InvalidCatalogName"):
        return f"Postgres{where}: {_reason(exc)}"
    if sqlstate is not None:
        return f"Postgres{where} refused: {_reason(exc)}"
    return f"cannot reach Postgres{where}: {_reason(exc)}"


def _where(servers: Servers | None, name: str) -> str:
    if servers is None:
        return ""
    return f" at {redact(servers.values.get(name, '?'))} (from {servers.source_of(name)})"


def _reason(exc: BaseException) -> str:
    text = one_line(str(exc)) if str(exc).strip() else type(exc).__name__
    return text


def _server_of(exc: BaseException) -> str | None:
    """Which server library raised ``exc`` (its class or any frame of its traceback)."""
    modules = [type(exc).__module__ or ""]
    tb = exc.__traceback__
    while tb is not None:
        modules.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    # The deepest frame decides: a Redis error raised inside our Postgres code is Redis's.
    for module in reversed(modules):
        root = module.split(".")[0]
        if root in ("asyncpg", "psycopg", "psycopg_pool", "yoyo"):
            return "postgres"
        if root in ("redis", "valkey"):
            return "redis"
    return None
