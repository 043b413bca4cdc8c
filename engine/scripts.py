"""Loads ``lua/`` once: expands includes, parses headers, computes SHAs.

Each script is a file named for the atomic command it performs. Shared helpers live in
``lua/lib/``, one ``local function`` each, pulled in by a ``--@include lib/<name>.lua`` line
that the loader expands once per script (a helper included twice is emitted once) and
refuses cycles. Calls go through :mod:`engine.access`, which sends EVALSHA and falls back
on NOSCRIPT.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources

_INCLUDE_RE = re.compile(r"^\s*--@include\s+(\S+)\s*$", re.MULTILINE)
_HEADER_RE = re.compile(r"\A--\[\[(.*?)\]\]", re.DOTALL)
_KEYS_RE = re.compile(r"^\s*KEYS\[(\d+)\]\s+(.*)$", re.MULTILINE)
_ARGV_RE = re.compile(r"^\s*ARGV\[(\d+)\]\s+(.*)$", re.MULTILINE)


class ScriptError(RuntimeError):
    """A script file is malformed (bad include, include cycle, missing header)."""


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str
    summary: str
    keys: dict[int, str] = field(default_factory=dict)
    argv: dict[int, str] = field(default_factory=dict)
    header: str = ""


def _read(package_files: resources.abc.Traversable, relative: str) -> str:
    node = package_files
    for part in relative.split("/"):
        node = node / part
    if not node.is_file():
        raise ScriptError(f"no such Lua file: {relative}")
    return node.read_text(encoding="utf-8")


def _generated(name: str) -> str:
    """Includes named ``@<name>`` are generated from Python, never written by hand."""
    if name == "@lifecycle":
        from engine.lifecycle import lua_table

        return lua_table()
    if name == "@outcomes":
        from engine.errors import lua_outcomes

        return lua_outcomes()
    raise ScriptError(f"no generated include {name}")


def expand(name: str, read=None) -> str:
    """The source of script ``name`` with every include expanded once, cycles refused."""
    files = resources.files("lua")
    read = read or (lambda rel: _generated(rel) if rel.startswith("@") else _read(files, rel))
    emitted: set[str] = set()

    def _expand(relative: str, stack: tuple[str, ...]) -> str:
        if relative in stack:
            raise ScriptError("include cycle: " + " -> ".join((*stack, relative)))
        text = read(relative)

        def _include(match: re.Match[str]) -> str:
            target = match.group(1)
            if target in emitted:
                return ""
            body = _expand(target, (*stack, relative))
            emitted.add(target)
            return body

        return _INCLUDE_RE.sub(_include, text)

    return _expand(name, ())


def parse_header(name: str, source: str) -> Script:
    match = _HEADER_RE.match(source)
    if match is None:
        raise ScriptError(f"{name}: a script must open with a --[[ header ]]")
    header = match.group(1)
    lines = [line.strip() for line in header.strip().splitlines()]
    keys = {int(n): desc.strip() for n, desc in _KEYS_RE.findall(header)}
    argv = {int(n): desc.strip() for n, desc in _ARGV_RE.findall(header)}
    return Script(
        name=name,
        source=source,
        sha=hashlib.sha1(source.encode()).hexdigest(),
        summary=lines[0] if lines else "",
        keys=keys,
        argv=argv,
        header=header,
    )


def script_names() -> list[str]:
    files = resources.files("lua")
    return sorted(
        entry.name[: -len(".lua")]
        for entry in files.iterdir()
        if entry.is_file() and entry.name.endswith(".lua")
    )


def load_all() -> dict[str, Script]:
    """Every top-level script of ``lua/``, expanded and parsed, by name (file stem)."""
    return {name: parse_header(name, expand(f"{name}.lua")) for name in script_names()}


_CACHE: dict[str, Script] | None = None


def scripts() -> dict[str, Script]:
    """The scripts, loaded once per process."""
    global _CACHE
    if _CACHE is None:
        _CACHE = load_all()
    return _CACHE
