"""Where the time goes: one bench phase under py-spy, summarised by function.

    python -m benchmarks.profile api --seconds 6       # the API worker under POST load
    python -m benchmarks.profile minimal --seconds 6   # the minimal endpoint's worker
    python -m benchmarks.profile engine --seconds 6    # a HoldEngine load process
    python -m benchmarks.profile worker --seconds 6    # a commit-queue worker draining a
                                                       # backlog (wall clock: --idle)

Starts what the phase needs (the same way ``slotguard bench`` does, own key prefix and
schema, removed afterwards), records the target process with ``py-spy record --format raw``
(sampled stacks, idle frames left out) and prints the functions with the largest inclusive
and self share of the samples. Needs py-spy and permission to ptrace (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.env import BenchEnv
from benchmarks.load import LoadSpec, Pattern, ResourceSpec, run_phase
from benchmarks.servers import start_api, start_baseline_app


def _py_spy() -> str:
    """py-spy on PATH, else beside this interpreter (a venv's bin/ not on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else "py-spy")


def summarise(raw: Path, top: int = 25) -> str:
    """Inclusive and self sample shares per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 2)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in own.most_common(top)]
    return "\n".join(lines)


def record(pid: int, seconds: float, out: Path, *, idle: bool = False) -> subprocess.Popen:
    return subprocess.Popen([_py_spy(), "record", "--format", "raw",
                             "--rate", "200", "--duration", str(int(seconds)), "--pid",
                             str(pid), "--output", str(out), "--nonblocking"]
                            + (["--idle"] if idle else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


async def profile_worker(seconds: float, backlog: int) -> str:
    """One worker draining a backlog, sampled on the wall clock (waits included)."""
    from dataclasses import replace

    from benchmarks.scenarios import FULL, Run

    env = await asyncio.to_thread(BenchEnv.start)
    out_dir = Path(tempfile.mkdtemp(prefix="slotguard-profile-"))
    raw = out_dir / "worker.txt"
    run = Run(env, replace(FULL, queue_workers=1, drain_backlog=backlog))
    spies = []
    start_workers = run.start_workers

    def start_and_record(count: int) -> None:
        start_workers(count)
        time.sleep(1.5)  # past start-up, into the drain
        spies.append(record(run.workers[-1].pid, seconds, raw, idle=True))

    run.start_workers = start_and_record
    try:
        await env.prepare()
        drain = await run.drain_backlog([])
        for spy in spies:
            spy.wait(timeout=seconds + 30)
        head = (f"worker: {drain['bookings_with_audit_per_s']} bookings/s with audit rows, "
                f"{drain['events_per_s']} events/s (one worker, under py-spy --idle)\n")
        return head + (summarise(raw) if raw.exists() else "py-spy wrote nothing")
    finally:
        run.stop_all()
        await env.close()
        env.stop_servers()
        shutil.rmtree(out_dir, ignore_errors=True)


async def profile(target: str, seconds: float, processes: int, connections: int,
                  workers: int) -> str:
    env = await asyncio.to_thread(BenchEnv.start)
    managed = None
    out_dir = Path(tempfile.mkdtemp(prefix="slotguard-profile-"))
    try:
        await env.prepare()
        if target == "api":
            resources = await env.create_vendor("prof", resources=16)
            managed, port = await asyncio.to_thread(start_api, env.settings, workers,
                                                    env.log_dir)
            spec_kwargs = {"workload": "http_create",
                           "http": {"port": port, "partner_key": env.partner_key}}
            pattern = Pattern("distinct", tuple(resources))
        elif target == "minimal":
            managed, port = await asyncio.to_thread(start_baseline_app, env.settings, workers,
                                                    env.log_dir)
            spec_kwargs = {"workload": "http_bare_hold", "http": {"port": port}}
            pattern = Pattern("distinct", tuple(ResourceSpec(f"p-{i}") for i in range(64)))
        else:
            spec_kwargs = {"workload": "hold"}
            pattern = Pattern("distinct", tuple(ResourceSpec(f"p-{i}") for i in range(64)))
        spec = LoadSpec(pattern=pattern, settings=env.settings, processes=processes,
                        concurrency=connections, seconds=seconds + 2, **spec_kwargs)
        result_box = {}
        thread = threading.Thread(target=lambda: result_box.update(r=run_phase(spec)))
        thread.start()
        time.sleep(spec.start_delay_s + 1.0)  # load running and warm
        if managed is not None:
            from benchmarks.cpu import process_cpu_s

            # The busiest process of the server's tree: a worker, not the master or
            # multiprocessing's resource tracker.
            pids = [p for p in managed.tree() if p != managed.pid] or [managed.pid]
            pid = max(pids, key=lambda p: process_cpu_s(p) or 0.0)
        else:
            pid = _load_process_pid()
        raw = out_dir / f"{target}.txt"
        spy = record(pid, seconds, raw)
        spy.wait(timeout=seconds + 30)
        thread.join(timeout=seconds + 60)
        summary = result_box["r"].summary
        head = (f"{target}: {summary.get('throughput_per_s')} ops/s under py-spy "
                f"(sampling slows the target a little); profiled pid {pid}\n")
        return head + (summarise(raw) if raw.exists() else "py-spy wrote nothing")
    finally:
        if managed is not None:
            await asyncio.to_thread(managed.stop)
        await env.close()
        env.stop_servers()
        shutil.rmtree(out_dir, ignore_errors=True)


def _load_process_pid() -> int:
    """The newest spawned load process of this interpreter (the child of ``run_phase``)."""
    import multiprocessing

    children = multiprocessing.active_children()
    return children[-1].pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["api", "minimal", "engine", "worker"])
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.target == "worker":
        print(asyncio.run(profile_worker(args.seconds, args.backlog)))
        return 0
    print(asyncio.run(profile(args.target, args.seconds, args.processes, args.connections,
                              args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
