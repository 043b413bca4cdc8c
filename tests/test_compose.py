"""docker-compose.yml agrees with the code: settings, CLI, ports, mounted config.

Docker is not needed: the file is parsed and checked against the repository. The CLI check
parses every command with the real ``slotguard`` parser (:func:`check_commands`), so a
renamed subcommand or flag fails here.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import pytest
import yaml

from engine.settings import env_names

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"

REQUIRED_SERVICES = {"redis", "postgres", "api", "worker", "migrate", "prometheus", "grafana"}
SLOTGUARD_SERVICES = ("api", "worker", "migrate")
PLAIN_ENV = {"REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR"}
CLI_SUBCOMMANDS = ("serve", "worker", "migrate", "up", "bench", "partners", "vendors", "keys")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def subcommands_of(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommand names of a real ``argparse`` parser."""
    names: set[str] = set()
    for action in parser._actions:  # argparse offers no public way to list subparsers
        if isinstance(action, argparse._SubParsersAction):
            names.update(action.choices)
    return names


def check_commands(services: dict, cli: argparse.ArgumentParser | Iterable[str]) -> list[str]:
    """Problems with the slotguard commands of ``services`` against ``cli``.

    ``cli`` is the CLI's ``argparse`` parser (then every command must also parse) or a
    list of subcommand names.
    """
    problems = []
    known = subcommands_of(cli) if isinstance(cli, argparse.ArgumentParser) else set(cli)
    for name in SLOTGUARD_SERVICES:
        argv = command_of(services[name])
        if not argv or argv[0] != "slotguard":
            problems.append(f"{name}: command {argv} does not run slotguard")
            continue
        if len(argv) < 2 or argv[1] not in known:
            problems.append(f"{name}: {argv[1:2]} is not a subcommand of {sorted(known)}")
            continue
        if isinstance(cli, argparse.ArgumentParser):
            try:
                cli.parse_args(argv[1:])
            except SystemExit:
                problems.append(f"{name}: the CLI rejects {argv[1:]}")
    return problems


def test_every_required_service_is_there(services):
    assert REQUIRED_SERVICES <= services.keys()


def test_slotguard_services_set_only_real_settings(services):
    allowed = PLAIN_ENV | set(env_names())
    for name in SLOTGUARD_SERVICES:
        env = services[name].get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        assert {"REDIS_URL", "DATABASE_URL"} <= env.keys(), name
        unknown = set(env) - allowed
        assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"
        assert env["REDIS_URL"].startswith("redis://redis:"), name
        assert env["DATABASE_URL"].startswith("postgresql://"), name
        assert "@postgres:" in env["DATABASE_URL"], name


def test_database_url_matches_the_postgres_service(services):
    pg = services["postgres"]["environment"]
    expected = (f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
                f"@postgres:5432/{pg['POSTGRES_DB']}")
    for name in SLOTGUARD_SERVICES:
        assert services[name]["environment"]["DATABASE_URL"] == expected, name


def test_redis_never_evicts_and_keeps_an_append_only_file(services):
    assert services["redis"]["image"].startswith("redis:7")
    argv = command_of(services["redis"])
    assert argv[0] == "redis-server"
    options = dict(zip(argv[1::2], argv[2::2]))
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"


def test_commands_name_real_cli_subcommands(services):
    from slotguard.cli import build_parser

    parser = build_parser()
    assert subcommands_of(parser) >= set(CLI_SUBCOMMANDS)
    assert check_commands(services, parser) == []
    assert command_of(services["api"])[1] == "serve"
    assert command_of(services["worker"])[1] == "worker"
    assert command_of(services["migrate"])[1] == "migrate"


def test_the_command_check_can_fail(services):
    broken = {**services, "worker": {**services["worker"], "command": "slotguard wrk"}}
    assert check_commands(broken, CLI_SUBCOMMANDS) == [
        f"worker: ['wrk'] is not a subcommand of {sorted(CLI_SUBCOMMANDS)}"]
    parser = argparse.ArgumentParser(prog="slotguard")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    for simple in ("worker", "migrate"):
        sub.add_parser(simple)
    # The real parser will know --workers and --metrics-port; this one does not.
    assert check_commands(services, parser) == [
        f"api: the CLI rejects {command_of(services['api'])[1:]}",
        f"worker: the CLI rejects {command_of(services['worker'])[1:]}",
    ]


def test_api_and_worker_wait_for_migrations(services):
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully", name
    for server in ("postgres", "redis"):
        assert services["migrate"]["depends_on"][server]["condition"] == "service_healthy"


def test_api_workers_share_a_fresh_multiprocess_dir(services):
    api = services["api"]
    assert "--workers" in command_of(api)
    assert api["environment"]["PROMETHEUS_MULTIPROC_DIR"] in api["tmpfs"]


def listening_ports(service: dict) -> set[int]:
    """Ports a slotguard service listens on, read from its command line."""
    argv = command_of(service)
    return {int(argv[i + 1]) for i, arg in enumerate(argv[:-1])
            if arg in ("--port", "--metrics-port")}


def container_to_repo(service: dict, container_path: str) -> Path | None:
    """The repository path a bind mount of ``service`` shows at ``container_path``."""
    target = PurePosixPath(container_path)
    for volume in service.get("volumes", []):
        source, mount, *_ = volume.split(":")
        if not source.startswith("."):
            continue  # a named volume
        mount = PurePosixPath(mount)
        if target == mount or mount in target.parents:
            return REPO / source / target.relative_to(mount)
    return None


def prometheus_config(services) -> tuple[PurePosixPath, dict]:
    argv = command_of(services["prometheus"])
    config_path = PurePosixPath(next(a.split("=", 1)[1] for a in argv
                                     if a.startswith("--config.file=")))
    local = container_to_repo(services["prometheus"], str(config_path))
    assert local is not None and local.is_file(), f"{config_path} is not mounted from the repo"
    return config_path, yaml.safe_load(local.read_text())


def test_prometheus_scrapes_the_ports_api_and_worker_listen_on(services):
    _, config = prometheus_config(services)
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    scraped = {}
    for target in targets:
        host, port = target.rsplit(":", 1)
        if host == "localhost":
            continue
        assert host in services, f"scrape target {target} is not a compose service"
        scraped[host] = int(port)
    assert scraped.keys() >= {"api", "worker"}
    for host, port in scraped.items():
        assert port in listening_ports(services[host]), (
            f"{host} is scraped on {port} but listens on {listening_ports(services[host])}")
    assert "8000:8000" in services["api"]["ports"]
    assert "9101" in [str(p) for p in services["worker"]["expose"]]


def test_prometheus_rule_files_are_mounted_from_the_repo(services):
    config_path, config = prometheus_config(services)
    assert config["rule_files"], "no alert rules loaded"
    for rule_file in config["rule_files"]:
        in_container = config_path.parent / rule_file  # relative to the config file
        local = container_to_repo(services["prometheus"], str(in_container))
        assert local is not None and local.is_file(), f"{rule_file} is not in the repo"
        assert yaml.safe_load(local.read_text())["groups"]


def test_grafana_provisioning_is_mounted_and_points_at_prometheus(services):
    grafana = services["grafana"]
    provisioning = container_to_repo(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert re.fullmatch(r"http://prometheus:(\d+)", url)
    assert f"{url.rsplit(':', 1)[1]}:9090" in services["prometheus"]["ports"]
    providers = yaml.safe_load((provisioning / "dashboards" / "slotguard.yml").read_text())
    dashboards = container_to_repo(grafana, providers["providers"][0]["options"]["path"])
    assert dashboards is not None and list(dashboards.glob("*.json"))


def test_the_image_installs_the_project():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)
    assert re.search(r"^USER (?!root)", dockerfile, re.M)
    for name in SLOTGUARD_SERVICES:
        assert yaml.safe_load(COMPOSE.read_text())["services"][name]["build"] == "."
