"""Results out: the JSON document, a console table, and a Markdown + HTML report with plots.

JSON shape (``--json PATH``)::

    {"slotguard_bench": 1, "started_at", "command", "machine", "servers", "config",
     "violations": <total>, "exit_code",
     "scenarios": {<name>: {"description", "phases": {<phase>: <summary>}, "violations",
                            "verifier": {...}, "ratio_to_baseline"?, "baseline"?,
                            "ratios"?, "targets": [...], "notes", "seconds", ...}}}

A phase summary: operations, seconds, throughput_per_s, outcomes, conflict_rate,
error_rate, latency_ms {p50, p95, p99, p99_9, max, mean}, latency_cdf_ms, timeline_per_s,
client_processes, client_cpu_per_process, client_cpu_us_per_op, and where measured
redis_cpu_us_per_op, server_cpu_s, postgres_cpu_us_per_op.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import orjson


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2
                                  | orjson.OPT_NON_STR_KEYS))


def phase_rows(results: dict[str, Any]):
    for name, scenario in results["scenarios"].items():
        for phase, s in scenario.get("phases", {}).items():
            if s and "throughput_per_s" in s:
                yield name, phase, s


def console_table(results: dict[str, Any]):
    from rich.table import Table

    table = Table(title="slotguard bench", show_lines=False)
    for column in ("scenario", "phase", "ops/s", "p50 ms", "p99 ms", "p99.9 ms", "conflict",
                   "error", "client cpu"):
        table.add_column(column, justify="right" if column not in ("scenario", "phase")
                         else "left")
    for name, phase, s in phase_rows(results):
        lat = s["latency_ms"]
        table.add_row(name, phase, f"{s['throughput_per_s']:,.0f}", f"{lat['p50']:.2f}",
                      f"{lat['p99']:.2f}", f"{lat['p99_9']:.2f}", f"{s['conflict_rate']:.1%}",
                      f"{s['error_rate']:.1%}", f"{s['client_cpu_per_process']:.2f}")
    return table


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, scenario in results["scenarios"].items():
        verdict = "ERROR " + scenario["error"] if "error" in scenario else (
            f"{scenario['violations']} violations")
        ratio = scenario.get("ratio_to_baseline")
        lines.append(f"{name}: {verdict}"
                     + (f"; ratio to {scenario.get('baseline')} {ratio}" if ratio else ""))
        for target in scenario.get("targets", []):
            mark = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
            lines.append(f"  target {target['target']}: {target['value']} "
                         f"({target['direction']} {target['bound']}) {mark}")
        for note in scenario.get("notes", []):
            lines.append(f"  note: {note}")
        for v in scenario.get("verifier", {}).get("violation_details", [])[:10]:
            lines.append(f"  VIOLATION {v['kind']}: {', '.join(v['ids'])} ({v['detail']})")
    return lines


def write_report(results: dict[str, Any], directory: Path) -> Path:
    """report.md, report.html and one PNG per plot in ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, scenario in results["scenarios"].items():
        phases = {p: s for p, s in scenario.get("phases", {}).items()
                  if s and s.get("timeline_per_s")}
        if not phases:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for phase, s in phases.items():
            ax.plot(range(len(s["timeline_per_s"])), s["timeline_per_s"], marker=".",
                    label=phase)
        ax.set_xlabel("second of the phase")
        ax.set_ylabel("completed operations / s")
        ax.set_title(f"{name}: throughput over time")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = directory / f"{name}-throughput.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append((name, "throughput over time", path.name))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for phase, s in phases.items():
            cdf = s.get("latency_cdf_ms") or []
            if cdf:
                ax.plot([v for _, v in cdf], [p for p, _ in cdf], marker=".", label=phase)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log)")
        ax.set_ylabel("percentile")
        ax.set_title(f"{name}: latency CDF")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = directory / f"{name}-latency-cdf.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append((name, "latency CDF", path.name))
    markdown = render_markdown(results, plots)
    (directory / "report.md").write_text(markdown)
    (directory / "report.html").write_text(render_html(results, plots))
    return directory / "report.md"


def render_markdown(results: dict[str, Any], plots) -> str:
    m = results["machine"]
    out = [f"# slotguard bench — {results['started_at']}", "",
           f"`{results['command']}` on {m['cpus']} CPUs ({m['cpu_model']}), load average "
           f"{m['loadavg_1m']} at start / {results.get('machine_end', {}).get('loadavg_1m')} "
           f"at end; servers: {results['servers']['source']}.", "",
           f"Total violations: **{results['violations']}**", "",
           "| scenario | phase | ops/s | p50 ms | p95 ms | p99 ms | p99.9 ms | conflicts | "
           "errors | client CPU/proc |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, phase, s in phase_rows(results):
        lat = s["latency_ms"]
        out.append(f"| {name} | {phase} | {s['throughput_per_s']:,.0f} | {lat['p50']:.2f} | "
                   f"{lat['p95']:.2f} | {lat['p99']:.2f} | {lat['p99_9']:.2f} | "
                   f"{s['conflict_rate']:.1%} | {s['error_rate']:.1%} | "
                   f"{s['client_cpu_per_process']:.2f} |")
    out += ["", "## Scenarios, ratios and targets", ""]
    out += [f"- {line}" if not line.startswith("  ") else f"  - {line.strip()}"
            for line in summary_lines(results)]
    for name, scenario in results["scenarios"].items():
        for note in scenario.get("notes", []):
            out.append(f"- {name}: note: {note}")
    out += ["", "## Plots", ""]
    for name, title, file in plots:
        out.append(f"### {name}: {title}\n\n![{name} {title}]({file})\n")
    return "\n".join(out) + "\n"


def render_html(results: dict[str, Any], plots) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(p)}</td>"
        f"<td>{s['throughput_per_s']:,.0f}</td><td>{s['latency_ms']['p50']:.2f}</td>"
        f"<td>{s['latency_ms']['p99']:.2f}</td><td>{s['latency_ms']['p99_9']:.2f}</td>"
        f"<td>{s['conflict_rate']:.1%}</td><td>{s['error_rate']:.1%}</td></tr>"
        for n, p, s in phase_rows(results))
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(results))
    images = "".join(f"<h3>{html.escape(n)}: {html.escape(t)}</h3><img src='{f}'>"
                     for n, t, f in plots)
    return (f"<!doctype html><meta charset='utf-8'><title>slotguard bench</title>"
            f"<h1>slotguard bench — {html.escape(results['started_at'])}</h1>"
            f"<p><code>{html.escape(results['command'])}</code>; total violations "
            f"<b>{results['violations']}</b></p>"
            f"<table border=1 cellpadding=4><tr><th>scenario</th><th>phase</th><th>ops/s</th>"
            f"<th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>conflicts</th><th>errors</th>"
            f"</tr>{rows}</table><ul>{lines}</ul>{images}")
