"""Metrics, alert rules and dashboard agree, and Prometheus's own tool accepts them.

``promtool`` (Debian: ``apt-get install -y prometheus``) is required under ``CI=true``;
elsewhere the promtool checks are skipped when it is missing. Exposition is produced in
child processes, because prometheus-client picks single- or multiprocess mode at import.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from engine import metrics

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))

# Prometheus's own series, which rules may use besides ours.
BUILTIN_SERIES = {"up"}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool is missing: CI must `apt-get install -y prometheus`")
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    return path


def run(*argv: str, stdin: str | None = None, env: dict | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


# promtool on the config files.
def test_alert_rules_are_valid(promtool):
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_is_valid_and_loads_the_rules(promtool):
    result = run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_alerts_fire_on_their_series_and_not_on_healthy_ones(promtool):
    result = run(promtool, "test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert tested == set(alert_names()), "every alert needs a firing case in alerts_test.yml"


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    # promtool has no offline "check expression": recording rules get the same parser.
    rules = [{"record": f"dashboard:query:{i}", "expr": grafana_to_promql(expr)}
             for i, expr in enumerate(dashboard_exprs())]
    assert rules
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# Every name used exists in engine/metrics.py, with the labels used.
def alert_names() -> list[str]:
    return [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def alert_exprs() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def alert_test_series() -> list[str]:
    return [series["series"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
            for series in test["input_series"]]


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            exprs.extend(target["expr"] for target in panel.get("targets", []))
    return exprs


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")


def exposed_series() -> dict[str, set[str]]:
    """Series name -> label names, for every metric in engine.metrics.REGISTRY."""
    series: dict[str, set[str]] = {}
    for name in dir(metrics):
        metric = getattr(metrics, name)
        if not isinstance(metric, (metrics.Counter, metrics.Gauge, metrics.Histogram)):
            continue
        family = metric.describe()[0]
        labels = set(metric._labelnames)  # no public accessor in prometheus-client
        if family.type == "counter":
            series[family.name + "_total"] = labels
        elif family.type == "histogram":
            series[family.name + "_bucket"] = labels | {"le"}
            series[family.name + "_count"] = labels
            series[family.name + "_sum"] = labels
        else:
            series[family.name] = labels
    return series


SCRAPE_LABELS = {"job", "instance"}
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def used_series(expr: str) -> dict[str, set[str]]:
    """slotguard_* names in an expression, with the label names their selectors match on."""
    used: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(expr):
        if name.startswith("slotguard_") or name in BUILTIN_SERIES:
            used.setdefault(name, set()).update(MATCHER.findall(matchers or ""))
    return used


@pytest.mark.parametrize("source", ["alerts", "alert tests", "dashboard"])
def test_every_series_used_is_defined_with_its_labels(source):
    texts = {"alerts": alert_exprs, "alert tests": alert_test_series,
             "dashboard": dashboard_exprs}[source]()
    assert texts
    defined = exposed_series()
    used_anything = False
    for text in texts:
        for name, labels in used_series(grafana_to_promql(text)).items():
            if name in BUILTIN_SERIES:
                continue
            used_anything = True
            assert name in defined, f"{source} uses {name}, which engine/metrics.py does not define"
            unknown = labels - defined[name] - SCRAPE_LABELS
            assert not unknown, f"{source} matches {name} on labels it lacks: {sorted(unknown)}"
    assert used_anything


def test_the_name_check_can_fail():
    used = used_series('sum(rate(slotguard_holds_placd_total{scope="ip"}[5m]))')
    assert used == {"slotguard_holds_placd_total": {"scope"}}
    assert "slotguard_holds_placd_total" not in exposed_series()
    assert exposed_series()["slotguard_rate_limit_rejections_total"] == {"scope"}


def test_dashboard_and_alerts_cover_every_metric():
    used = set()
    for text in alert_exprs() + dashboard_exprs():
        used.update(used_series(grafana_to_promql(text)))
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    defined = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in exposed_series()}
    assert defined - families == set(), "metrics nobody looks at"


# The exposition itself.
TOUCH_EVERY_METRIC = textwrap.dedent("""
    import sys
    from engine import metrics
    SAMPLE = {"from_state": "HELD", "to_state": "EXPIRED", "scope": "ip",
              "script": "place_hold", "route": "/v1/reservations/{reservationId}",
              "method": "GET", "status": "200", "shard": "0", "kind": "unit_of_missing_reservation",
              "reason": "revoked", "partner": "p1", "outcome": "placed"}
    for name in dir(metrics):
        metric = getattr(metrics, name)
        if isinstance(metric, (metrics.Counter, metrics.Gauge, metrics.Histogram)):
            child = metric.labels(**{l: SAMPLE[l] for l in metric._labelnames}) \\
                if metric._labelnames else metric
            if isinstance(metric, metrics.Counter):
                child.inc()
            elif isinstance(metric, metrics.Gauge):
                child.set(3)
            else:
                child.observe(0.002)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain"), content_type
    sys.stdout.write(body.decode())
""")


def child_env(multiproc_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("PROMETHEUS_MULTIPROC_DIR",)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    return env


@pytest.mark.parametrize("mode", ["single", "multiprocess"])
def test_exposition_of_every_metric_passes_promtool(promtool, tmp_path, mode):
    directory = tmp_path if mode == "multiprocess" else None
    result = run(sys.executable, "-c", TOUCH_EVERY_METRIC, env=child_env(directory))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in exposed_series():
        assert re.search(rf"^{name}(\{{| )", text, re.M), f"{name} missing from exposition"
    if mode == "multiprocess":
        assert list(tmp_path.glob("*.db")), "multiprocess mode wrote no files"
        assert "process_cpu_seconds_total" not in text
    else:
        assert "process_cpu_seconds_total" in text
    lint = run(promtool, "check", "metrics", stdin=text)
    assert lint.returncode == 0 and lint.stdout.strip() == "", lint.stdout + lint.stderr


WRITER = textwrap.dedent("""
    import sys
    from engine import metrics
    holds, queue_length = int(sys.argv[1]), int(sys.argv[2])
    metrics.HOLDS_PLACED.inc(holds)
    metrics.COMMIT_QUEUE_LENGTH.labels(shard="0").set(queue_length)
    metrics.DRAIN_SECONDS.observe(0.02)
    print("written", flush=True)
    sys.stdin.readline()  # stay alive until told to go
""")

READER = textwrap.dedent("""
    from engine import metrics
    from prometheus_client.parser import text_string_to_metric_families
    dead = metrics.reap_dead_processes()
    values = {s.name + str(sorted(s.labels.items())): s.value
              for f in text_string_to_metric_families(metrics.render()[0].decode())
              for s in f.samples}
    print(len(dead), values.get("slotguard_holds_placed_total[]"),
          values.get("slotguard_commit_queue_length[('shard', '0')]"),
          values.get("slotguard_drain_seconds_count[]"))
""")


def test_several_processes_aggregate_into_one_exposition(tmp_path):
    env = child_env(tmp_path)
    writers = []
    try:
        for holds, length in ((3, 5), (4, 9)):
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(holds), str(length)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, cwd=REPO, env=env)
            writers.append(writer)
            assert writer.stdout.readline().strip() == "written"

        def read() -> list[str]:
            result = run(sys.executable, "-c", READER, env=env)
            assert result.returncode == 0, result.stderr
            return result.stdout.split()

        # Counters and histograms sum; the queue gauge is the largest among live processes.
        assert read() == ["0", "7.0", "9.0", "2.0"]
        writers[1].stdin.close()
        assert writers[1].wait(10) == 0
        # The dead writer's counts stay; its gauge reading goes once it is reaped.
        assert read() == ["1", "7.0", "5.0", "2.0"]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            for stream in (writer.stdin, writer.stdout):
                if stream and not stream.closed:
                    stream.close()


def test_setting_the_multiprocess_dir_too_late_is_refused(tmp_path):
    late = textwrap.dedent(f"""
        import os
        from engine import metrics
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        try:
            metrics.render()
        except RuntimeError as exc:
            print("refused:", exc)
    """)
    result = run(sys.executable, "-c", late, env=child_env(None))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: PROMETHEUS_MULTIPROC_DIR changed")


def test_reset_empties_the_multiprocess_dir(tmp_path):
    (tmp_path / "counter_123.db").write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("not ours")
    metrics.reset_multiprocess_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_partner_reputation_keeps_cardinality_bounded():
    counts = {f"rep-partner-{i:03d}": (100 + i, i) for i in range(60)}
    metrics.publish_partner_reputation(counts, limit=5)
    value = metrics.REGISTRY.get_sample_value
    busiest = [f"rep-partner-{i:03d}" for i in range(59, 54, -1)]
    for partner in busiest:
        assert value("slotguard_partner_holds", {"partner": partner, "outcome": "placed"}) \
            == counts[partner][0]
    assert value("slotguard_partner_holds", {"partner": "rep-partner-000", "outcome": "placed"}) \
        is None
    rest = [c for p, c in counts.items() if p not in busiest]
    assert value("slotguard_partner_holds", {"partner": "_other", "outcome": "placed"}) == \
        sum(p for p, _ in rest)
    assert value("slotguard_partner_holds", {"partner": "_other", "outcome": "committed"}) == \
        sum(c for _, c in rest)
    # A partner that drops out of the top is zeroed, not left at its old value.
    metrics.publish_partner_reputation({"rep-partner-new": (1, 1)}, limit=5)
    assert value("slotguard_partner_holds",
                 {"partner": "rep-partner-059", "outcome": "placed"}) == 0
