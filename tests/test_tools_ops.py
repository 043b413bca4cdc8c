"""Issue 17, ops hygiene: SLOTGUARD_METRICS_TOKEN on the API's and the worker's /metrics,
403 and 429 counted, one log format (plain or JSON) across uvicorn, the API and the worker."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import httpx
import pytest

from engine import metrics
from engine.keys import KeySpace
from slotguard.cli_worker import serve_metrics
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_cli import CLI, cli_env, free_port, run  # noqa: F401  (fixture)

TOKEN = "metrics-s3cret"


@pytest.fixture
def api_settings(settings):
    # A small partner burst: the third read in a row is refused (429).
    return settings.replace(partner_rate_burst=2, partner_rate_per_minute=1,
                            ip_rate_burst=4_000, ip_rate_per_minute=1_200_000,
                            metrics_token=TOKEN)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_need_the_token(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        r = await client.get("/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "METRICS_TOKEN_REQUIRED"
        assert r.headers["www-authenticate"] == "Bearer"
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "slotguard_auth_failures_total" in r.text


async def test_403_and_429_are_counted(client, world):
    forbidden = sample("slotguard_auth_failures_total", reason="forbidden")
    r = await client.get("/v1/ops/audit", headers=world.auth("p1"))
    assert r.status_code == 403
    assert sample("slotguard_auth_failures_total", reason="forbidden") == forbidden + 1

    limited = sample("slotguard_rate_limit_rejections_total", scope="partner")
    statuses = []
    for _ in range(3):
        r = await client.get("/v1/reservations", headers=world.auth("p2"))
        statuses.append(r.status_code)
    assert statuses == [200, 200, 429]
    assert sample("slotguard_rate_limit_rejections_total", scope="partner") == limited + 1


def test_the_worker_metrics_server_needs_the_token():
    port = free_port()
    server = serve_metrics(port, "127.0.0.1", metrics.REGISTRY, TOKEN)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200 and b"slotguard_" in reply.read()
    finally:
        server.shutdown()
        server.server_close()


PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+ \[[^\]]+\] ")


def _run_for_a_while(cli_env, args: list[str], ready) -> list[str]:
    proc = subprocess.Popen([*CLI, *args], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ready(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("log_format", ["json", "plain"])
async def test_one_log_format_for_api_and_worker(cli_env, settings, redis, log_format):
    run(cli_env, "migrate")
    env = {**cli_env, "SLOTGUARD_LOG_FORMAT": log_format}
    keys = KeySpace(settings.key_prefix, settings.shards)
    for shard in range(settings.shards):
        await redis.set(keys.ready(shard), "1")
    port = free_port()

    def api_ready(proc):
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5,
                             headers={"X-Request-Id": "req-log-1"}).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not get ready"
            time.sleep(0.2)

    api_lines = _run_for_a_while(env, ["serve", "--port", str(port)], api_ready)

    def worker_started(proc):
        # Whatever the worker logs in its first seconds (its start, arq's, the drain's):
        # every line is checked below, however many there are.
        time.sleep(10)
        assert proc.poll() is None

    worker_lines = _run_for_a_while(env, ["worker"], worker_started)
    lines = api_lines + worker_lines  # every line, the servers' own start included
    assert any("uvicorn" in line for line in lines), api_lines
    assert any("worker starting" in line for line in lines), worker_lines
    assert any("req-log-1" in line and "/health/ready" in line for line in lines), api_lines
    for line in lines:
        if log_format == "json":
            record = json.loads(line)
            assert set(record) >= {"at", "level", "logger", "requestId", "message"}, line
        else:
            assert PLAIN_LINE.match(line), line


def test_partner_series_are_hashed_and_limited_by_settings():
    from jobs.metrics import WorkerMetrics, partner_label

    counts = {f"tools-partner-{i}": (100 - i, i) for i in range(5)}
    WorkerMetrics(partner_labels=False, partner_series=2).partner_reputation(counts)
    shown = [partner_label(f"tools-partner-{i}", plain=False) for i in range(2)]
    for label, partner in zip(shown, counts):
        assert label.startswith("p_") and partner not in label
        assert sample("slotguard_partner_holds", partner=label,
                      outcome="placed") == counts[partner][0]
    folded = partner_label("tools-partner-2", plain=False)
    assert metrics.REGISTRY.get_sample_value(
        "slotguard_partner_holds", {"partner": folded, "outcome": "placed"}) is None
    assert sample("slotguard_partner_holds", partner="_other",
                  outcome="placed") == sum(placed for placed, _ in list(counts.values())[2:])
    exposed = metrics.generate_latest(metrics.REGISTRY).decode()
    assert not any(f"tools-partner-{i}" in exposed for i in range(5))
