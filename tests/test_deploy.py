"""``docker-compose.yml`` and ``deploy/``: restart policies, readiness checks the balancer waits
for, no fixed subnet, and the ``monitoring`` profile (Prometheus scraping every instance, Grafana
with its datasource and dashboard), read from the files, and, where a Compose binary exists,
from ``config``'s own rendering. No Docker engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DEPLOY = REPO / "deploy"
#: The port the image serves on (Dockerfile: tether serve --port 8000).
PORT = 8000
#: The metrics the dashboard charts (served on each instance's GET /metrics).
METRICS = (
    "tether_connections",
    "tether_auth_events_total",
    "tether_refresh_total",
    "tether_revocation_latency_seconds",
    "tether_mutations_total",
    "tether_fanout_latency_seconds",
    "tether_redis_errors_total",
)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    services: dict[str, Any] = load(COMPOSE)["services"]
    return services


def instances(services: dict[str, Any]) -> list[str]:
    """The Tether instances: the services built from this repository."""
    return sorted(name for name, service in services.items() if "build" in service)


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key), value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def test_every_service_restarts_after_a_crash(services: dict[str, Any]) -> None:
    assert len(instances(services)) >= 2
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "always"), name


def test_the_balancer_waits_for_every_instance_to_be_ready(services: dict[str, Any]) -> None:
    nginx = (DEPLOY / "nginx.conf").read_text()
    upstream = set(re.findall(r"^\s*server\s+([\w.-]+):(\d+)", nginx, re.MULTILINE))
    assert upstream == {(name, str(PORT)) for name in instances(services)}
    (balancer,) = [
        s for s in services.values() if "./deploy/nginx.conf" in " ".join(s.get("volumes", []))
    ]
    for name in instances(services):
        check = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{PORT}/readyz" in check, name
        assert balancer["depends_on"][name] == {"condition": "service_healthy"}, name
        # And an instance starts once Redis answers.
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert "healthcheck" in services["redis"]


def test_no_fixed_subnet_that_could_clash() -> None:
    for key, value in walk(load(COMPOSE)):
        assert key not in ("ipam", "subnet", "ipv4_address", "ipv6_address"), (key, value)


def test_monitoring_profile_scrapes_every_instance(services: dict[str, Any]) -> None:
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    assert all(not s.get("profiles") for n, s in services.items() if n not in monitoring)

    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    (job,) = load(DEPLOY / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["type"] == "A" and discovery["port"] == PORT
    (alias,) = discovery["names"]
    for name in instances(services):
        assert alias in services[name]["networks"]["default"]["aliases"], name


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource(
    services: dict[str, Any],
) -> None:
    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    for source in mounts:
        assert (REPO / source).exists(), source
    provisioning = REPO / "deploy/grafana/provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"

    (datasource,) = load(provisioning / "datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in " ".join(services["prometheus"]["ports"])

    (provider,) = load(provisioning / "dashboards/tether.yml")["providers"]
    folder = provider["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == folder
    dashboards = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
    assert [d.name for d in dashboards] == ["tether.json"]
    dashboard = json.loads(dashboards[0].read_text())
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            exprs.append(target["expr"])
    charted = " ".join(exprs)
    for metric in METRICS:
        assert re.search(rf"\b{metric}(_bucket)?\{{", charted), metric


def compose_commands() -> list[list[str]]:
    """The Compose binaries on this machine: Debian's ``docker-compose`` (v1) and the
    ``docker compose`` plugin (v2), whichever exist."""
    commands = []
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            commands.append([docker, "compose"])
    return commands


@pytest.mark.parametrize(
    "profile", [[], ["--profile", "monitoring"]], ids=["default", "monitoring"]
)
def test_compose_config_accepts_the_file(profile: list[str]) -> None:
    if not compose_commands():
        # CI installs Debian's docker-compose (.ci/install-compose): there, its absence fails.
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI must validate docker-compose.yml, but no docker-compose is installed")
        pytest.skip("no docker-compose or docker compose here (bash .ci/install-compose)")
    for command in compose_commands():
        result = subprocess.run(
            [*command, "-f", str(COMPOSE), *profile, "config"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        rendered = yaml.safe_load(result.stdout)["services"]
        # The second instance inherits the first's settings (a YAML merge): as Compose reads it.
        for name in instances(rendered):
            assert "/readyz" in " ".join(rendered[name]["healthcheck"]["test"]), name
            assert rendered[name]["restart"] == "unless-stopped", name
