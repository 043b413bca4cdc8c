"""Measurements of one load phase: an HDR latency histogram, outcome counts, a throughput
timeline and the CPU the load processes spent; mergeable across processes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LATENCY_MAX_US = 60_000_000  # one minute; anything slower is clamped (and counted as such)
PERCENTILES = (50.0, 95.0, 99.0, 99.9)
CDF_POINTS = (0, 10, 25, 50, 75, 90, 95, 98, 99, 99.5, 99.9, 99.99, 100)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, LATENCY_MAX_US, 3)


@dataclass
class Recorder:
    """What one load process measured; plain data so it pickles back to the parent."""

    started: float = 0.0  # time.monotonic() at the common start
    histogram: HdrHistogram = field(default_factory=new_histogram)
    outcomes: dict[str, int] = field(default_factory=dict)
    timeline: list[int] = field(default_factory=list)  # completions per second since start
    # Completions per 100 ms since start: a short (--quick) phase still plots as a curve.
    timeline_100ms: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def record(self, outcome: str, sent: float, answered: float) -> None:
        micros = max(1, min(int((answered - sent) * 1e6), LATENCY_MAX_US))
        self.histogram.record_value(micros)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        second = int(answered - self.started)
        if second >= 0:
            while len(self.timeline) <= second:
                self.timeline.append(0)
            self.timeline[second] += 1
            tenth = int((answered - self.started) * 10)
            while len(self.timeline_100ms) <= tenth:
                self.timeline_100ms.append(0)
            self.timeline_100ms[tenth] += 1

    def to_wire(self) -> dict[str, Any]:
        return {"started": self.started, "histogram": self.histogram.encode(),
                "outcomes": self.outcomes, "timeline": self.timeline,
                "timeline_100ms": self.timeline_100ms, "cpu_s": self.cpu_s,
                "wall_s": self.wall_s}


def merge(wires: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's summary from the recorders of all its processes."""
    histogram = new_histogram()
    outcomes: dict[str, int] = {}
    timeline: list[int] = []
    tenths: list[int] = []
    for wire in wires:
        histogram.decode_and_add(wire["histogram"])
        for key, value in wire["outcomes"].items():
            outcomes[key] = outcomes.get(key, 0) + value
        for i, value in enumerate(wire["timeline"]):
            while len(timeline) <= i:
                timeline.append(0)
            timeline[i] += value
        for i, value in enumerate(wire.get("timeline_100ms", ())):
            while len(tenths) <= i:
                tenths.append(0)
            tenths[i] += value
    total = sum(outcomes.values())
    wall = max((w["wall_s"] for w in wires), default=0.0)
    cpu = sum(w["cpu_s"] for w in wires)
    return {
        "operations": total,
        "seconds": round(wall, 3),
        "throughput_per_s": round(total / wall, 1) if wall else 0.0,
        "outcomes": outcomes,
        "conflict_rate": round(outcomes.get("conflict", 0) / total, 4) if total else 0.0,
        "error_rate": round(outcomes.get("error", 0) / total, 4) if total else 0.0,
        "latency_ms": latency_summary(histogram),
        "latency_cdf_ms": [[p, histogram.get_value_at_percentile(p) / 1000]
                           for p in CDF_POINTS] if total else [],
        "timeline_per_s": timeline,
        # ops/s over each 100 ms of the phase (completions in the bucket x 10).
        "timeline_per_100ms": [count * 10 for count in tenths],
        "client_processes": len(wires),
        "client_cpu_s": round(cpu, 3),
        # Near 1.0 per process means the load generator itself was saturated.
        "client_cpu_per_process": round(cpu / wall / len(wires), 3) if wall and wires else 0.0,
        "client_cpu_us_per_op": round(cpu / total * 1e6, 1) if total else 0.0,
    }


def latency_summary(histogram: HdrHistogram) -> dict[str, float]:
    if histogram.get_total_count() == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "p99_9": 0.0, "max": 0.0, "mean": 0.0}
    values = {f"p{p:g}".replace(".", "_"): histogram.get_value_at_percentile(p) / 1000
              for p in PERCENTILES}
    values["max"] = histogram.get_max_value() / 1000
    values["mean"] = round(histogram.get_mean_value() / 1000, 3)
    return values


class CpuClock:
    """CPU time of this process over a block (the client's own cost per operation)."""

    def __enter__(self) -> CpuClock:
        self._cpu = time.process_time()
        self._wall = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_s = time.process_time() - self._cpu
        self.wall_s = time.monotonic() - self._wall
