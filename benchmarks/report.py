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


def _get(tree: Any, *path: Any) -> Any:
    for step in path:
        if isinstance(tree, dict):
            tree = tree.get(step)
        elif isinstance(tree, list) and isinstance(step, int) and -len(tree) <= step < len(tree):
            tree = tree[step]
        else:
            return None
    return tree


def _row(target: str, value: Any, bound: float, *, higher: bool = True, measured: str = "",
         source: str = "") -> dict[str, Any]:
    met = None if value is None else (value >= bound if higher else value <= bound)
    return {"target": target, "value": value, "bound": bound,
            "direction": ">=" if higher else "<=",
            "ratio_to_bound": round(value / bound, 3) if value is not None and bound else None,
            "met": met, "measured": measured, "source": source}


def _rate(phase: dict | None) -> str:
    return f"{phase['throughput_per_s']:,.0f}/s" if phase and "throughput_per_s" in phase \
        else "?"


def issue_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 10 ("Targets"), measured in this run (None: not measured)."""
    sc = results.get("scenarios", {})
    hot, eva = sc.get("hot_slot", {}), sc.get("engine_vs_api", {})
    cost, scale = sc.get("redis_cost", {}), sc.get("scale", {})
    life = sc.get("lifecycle", {})
    cfg = results.get("config", {})
    rows = []
    api, minimal = _get(eva, "phases", "api"), _get(eva, "phases", "minimal_endpoint")
    rows.append(_row("POST /v1/reservations >= 1.0x minimal_endpoint (distinct slots)",
                     _get(eva, "ratios", "api_to_minimal_endpoint"), 1.0,
                     measured=f"{_rate(api)} vs {_rate(minimal)}", source="engine_vs_api"))
    hot_api, hot_pg = _get(hot, "phases", "api"), _get(hot, "phases", "pg_endpoint")
    rows.append(_row("POST /v1/reservations >= 1.5x pg_endpoint (hot slot)",
                     _get(hot, "ratios", "api_to_pg_endpoint"), 1.5,
                     measured=f"{_rate(hot_api)} vs {_rate(hot_pg)} decisions",
                     source="hot_slot"))
    pg = _get(eva, "phases", "pg_endpoint")
    rows.append(_row("POST /v1/reservations >= 1.0x pg_endpoint (distinct slots)",
                     _get(eva, "ratios", "api_to_pg_endpoint"), 1.0,
                     measured=f"{_rate(api)} vs {_rate(pg)}", source="engine_vs_api"))
    cpu = cost.get("redis_cpu_us") or {}
    rows.append(_row("Redis CPU per successful create <= 3x the engine's per placed hold",
                     _get(cost, "ratios", "create_to_engine_place"), 3.0, higher=False,
                     measured=f"{cpu.get('create')} vs {cpu.get('engine_place')} µs",
                     source="redis_cost"))
    rows.append(_row("Redis CPU per conflicting create <= 1.5x the engine's per placed hold",
                     _get(cost, "ratios", "conflict_to_engine_place"), 1.5, higher=False,
                     measured=f"{cpu.get('conflict')} vs {cpu.get('engine_place')} µs",
                     source="redis_cost"))
    connections = (cfg.get("processes") or 0) * (cfg.get("concurrency") or 0)
    rows.append(_row(f"p99 of a create <= 25 ms at 64 connections (this run: {connections})",
                     _get(api, "latency_ms", "p99"), 25.0, higher=False,
                     measured=f"{_get(api, 'latency_ms', 'p99')} ms", source="engine_vs_api"))
    drain = _get(life, "phases", "drain") or {}
    rows.append(_row("commit-queue drain >= 5,000 bookings/s with complete audit rows "
                     "(20,000 backlog, 2 workers)",
                     (drain.get("bookings_with_audit_per_s") if drain.get("audit_rows_complete")
                      else 0) if drain else None, 5000,
                     measured=f"{drain.get('bookings_with_audit_per_s')}/s, backlog "
                              f"{drain.get('backlog')}, {drain.get('workers')} workers, audit "
                              f"complete {drain.get('audit_rows_complete')}",
                     source="lifecycle"))
    big = _get(scale, "drains", -1) or {}
    rows.append(_row("drain >= 3,000 bookings/s with 10^6 bookings already in the table "
                     f"(this run: {big.get('bookings_in_table_before')})",
                     (big.get("bookings_with_audit_per_s") if big.get("audit_rows_complete")
                      else 0) if big else None, 3000,
                     measured=f"{big.get('bookings_with_audit_per_s')}/s, backlog "
                              f"{big.get('backlog')}", source="scale"))
    points = scale.get("points") or []
    last = points[-1] if points else {}
    rows.append(_row("<= 1 KiB of Redis per live reservation (record, history, units, cap)",
                     last.get("bytes_per_live_reservation"), 1024, higher=False,
                     measured=", ".join(f"{p['bytes_per_live_reservation']} B at "
                                        f"{p['live_reservations']:,}" for p in points),
                     source="scale"))
    first = points[0] if points else {}
    for kind, key in (("API", "api_per_s"), ("engine", "engine_per_s")):
        value = round(last[key] / first[key], 3) if len(points) > 1 and last.get(key) \
            and first.get(key) else None
        rows.append(_row(f"{kind} throughput at 10^6 live holds within 20 % of that at 10^3 "
                         f"(this run: {last.get('live_reservations')} vs "
                         f"{first.get('live_reservations')})", value, 0.8,
                         measured=f"{last.get(key)} vs {first.get(key)}/s", source="scale"))
    return rows


def targets_table(results: dict[str, Any]):
    from rich.table import Table

    table = Table(title="issue 10 targets", show_lines=False)
    for column in ("target", "measured", "value", "bound", "met"):
        table.add_column(column, justify="left" if column in ("target", "measured")
                         else "right")
    for row in results.get("targets", []):
        table.add_row(row["target"], row["measured"], _fmt(row["value"]),
                      f"{row['direction']} {row['bound']:g}", _mark(row["met"]))
    return table


def missed_targets(results: dict[str, Any]) -> list[str]:
    """Every target this run measured and missed, one line each (the run's own targets and
    the scenarios')."""
    lines = []
    for row in results.get("targets", []):
        if row.get("met") is False:
            lines.append(f"{row['target']}: {_fmt(row['value'])} (bound {row['direction']} "
                         f"{row['bound']:g}; {row['measured']})")
    for name, scenario in results.get("scenarios", {}).items():
        for target in scenario.get("targets", []):
            if target.get("met") is False:
                lines.append(f"{name}: {target['target']}: {target['value']} "
                             f"(bound {target['direction']} {target['bound']})")
    return lines


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:,.3f}".rstrip("0").rstrip(".") \
        if isinstance(value, float) else f"{value:,}"


def _mark(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, scenario in results["scenarios"].items():
        verdict = "ERROR " + scenario["error"] if "error" in scenario else (
            f"{scenario['violations']} violations")
        ratio = scenario.get("ratio_to_baseline")
        lines.append(f"{name}: {verdict}"
                     + (f"; ratio to {scenario.get('baseline')} {ratio}" if ratio else ""))
        ratios = {k: v for k, v in (scenario.get("ratios") or {}).items() if v is not None}
        if ratios:
            lines.append("  ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
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
            xs, ys = throughput_series(s)
            ax.plot(xs, ys, marker=".", label=phase)
        ax.set_xlabel("seconds into the phase")
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
    plots += scale_plots(results, directory, plt)
    markdown = render_markdown(results, plots)
    (directory / "report.md").write_text(markdown)
    (directory / "report.html").write_text(render_html(results, plots))
    return directory / "report.md"


def throughput_series(phase: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(seconds, ops/s) of a phase: per 100 ms when recorded (a 0.7 s --quick phase is 7
    points, not 2), else per second; the last, partial bucket is left out."""
    tenths = phase.get("timeline_per_100ms") or []
    if len(tenths) > 1:
        tenths = tenths[:-1]
        return [round((i + 0.5) / 10, 2) for i in range(len(tenths))], list(tenths)
    per_s = phase.get("timeline_per_s") or []
    return [i + 0.5 for i in range(len(per_s))], list(per_s)


def scale_plots(results: dict[str, Any], directory: Path, plt) -> list[tuple[str, str, str]]:
    """The scale scenario: throughput and bytes per live reservation against the live set,
    drain rate against the bookings already in the table."""
    scale = results["scenarios"].get("scale") or {}
    points, drains = scale.get("points") or [], scale.get("drains") or []
    plots = []
    if points:
        xs = [p["live_reservations"] for p in points]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key, label in (("engine_per_s", "HoldEngine placements/s"),
                           ("api_per_s", "POST /v1/reservations/s")):
            if all(p.get(key) for p in points):
                ax.plot(xs, [p[key] for p in points], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("live reservations in Redis")
        ax.set_ylabel("operations / s")
        ax.set_title("scale: throughput against the live set")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(directory / "scale-throughput.png", dpi=100)
        plt.close(fig)
        plots.append(("scale", "throughput against the live set", "scale-throughput.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(xs, [p["bytes_per_live_reservation"] for p in points], marker="o")
        ax.axhline(1024, linestyle="--", color="grey", label="1 KiB target")
        ax.set_xscale("log")
        ax.set_xlabel("live reservations in Redis")
        ax.set_ylabel("bytes / live reservation")
        ax.set_title("scale: Redis memory per live reservation")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(directory / "scale-memory.png", dpi=100)
        plt.close(fig)
        plots.append(("scale", "Redis memory per live reservation", "scale-memory.png"))
    if drains:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([d["bookings_in_table_before"] for d in drains],
                [d["bookings_with_audit_per_s"] or 0 for d in drains], marker="o")
        ax.axhline(3000, linestyle="--", color="grey", label="3,000/s target")
        ax.set_xscale("log")
        ax.set_xlabel("bookings already in the table")
        ax.set_ylabel("bookings / s (audit rows complete)")
        ax.set_title("scale: commit-queue drain against the table size")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(directory / "scale-drain.png", dpi=100)
        plt.close(fig)
        plots.append(("scale", "drain rate against the table size", "scale-drain.png"))
    return plots


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
    out += ["", "## Issue 10 targets", "", "| target | measured | value | bound | met |",
            "|---|---|---:|---:|---|"]
    for row in results.get("targets", []):
        out.append(f"| {row['target']} | {row['measured']} | {_fmt(row['value'])} | "
                   f"{row['direction']} {row['bound']:g} | {_mark(row['met'])} |")
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
