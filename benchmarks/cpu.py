"""Server CPU time from ``/proc/<pid>/stat``: the Redis server and Postgres backends.

Only meaningful when the server runs on this machine; every function answers ``None`` when
the process cannot be seen (another host, another container), and the report says so.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, or None when it is not visible here."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def redis_server_pid(client) -> int | None:
    """The Redis server's pid when it runs on this machine (``INFO server`` process_id)."""
    info = await client.info("server")
    pid = int(info.get("process_id") or 0)
    name = process_name(pid) if pid else ""
    if not any(n in name for n in ("redis", "valkey")):
        return None
    return pid


def machine() -> dict:
    """What the figures were measured on, and how busy it was."""
    load1, load5, _ = os.getloadavg()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "loadavg_1m": round(load1, 2),
            "loadavg_5m": round(load5, 2)}
