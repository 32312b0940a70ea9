"""The Grafana dashboard and the Prometheus example: every series the dashboard queries is one
jfsync's /metrics serves, and the compose profile wires Prometheus to jfsync and Grafana to
both (read with PyYAML: Docker cannot run here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.operate.conftest import StackFactory

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "jfsync-dashboard.json"
PROMETHEUS = ROOT / "examples" / "prometheus.yml"
SERIES = re.compile(r"\bjfsync_[a-z0-9_]+")


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _queries(dashboard: dict[str, Any]) -> list[str]:
    found = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard["templating"]["list"]:
        if isinstance(variable.get("query"), dict):
            found.append(variable["query"]["query"])
    return found


async def test_every_series_the_dashboard_queries_is_served(make_stack: StackFactory) -> None:
    stack = await make_stack()
    # Series that only exist once something is known (as a running jfsync has them).
    stack.service.last_reconcile_ms = 1_700_000_000_000
    stack.service.identity.status = lambda: {  # type: ignore[method-assign]
        "pairs": [{"servers": ["home", "cabin"], "matched": 18, "unmatched": 2, "ambiguous": 1}]
    }
    await stack.flow(stack.home, stack.items[0], is_favorite=True)
    status, text = await stack.get("/metrics")
    assert status == 200, text
    served: set[str] = set()
    for family in text_string_to_metric_families(text):
        served.add(family.name)
        served.update(sample.name for sample in family.samples)

    queried = {name for query in _queries(_dashboard()) for name in SERIES.findall(query)}
    assert queried, "the dashboard queries nothing"
    assert queried - served == set(), f"queried but not served: {sorted(queried - served)}"
    # Every series jfsync serves is on the dashboard (the _bucket of the histogram stands for it).
    families = {f.name for f in text_string_to_metric_families(text) if f.name.startswith("jfsync")}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    assert families - shown == set(), f"not on the dashboard: {sorted(families - shown)}"


def test_the_dashboard_is_importable() -> None:
    """One Prometheus datasource variable used by every panel; unique ids; no overlaps."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "jfsync"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'job=~"$job"' in target["expr"], target["expr"]


def test_the_monitoring_profile_scrapes_jfsync_and_provisions_grafana() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} is published beyond loopback"
    # Without the profile nothing changes for the three services that replicate.
    for name in ("jellyfin-a", "jellyfin-b", "jfsync"):
        assert "profiles" not in services[name]

    prometheus = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    [job] = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    [target] = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert host == "jfsync"
    jfsync_config = yaml.safe_load(
        (ROOT / "examples" / "jfsync.compose.yaml").read_text(encoding="utf-8")
    )
    assert jfsync_config["status"]["listen"].endswith(f":{port}")

    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["grafana"]["volumes"]}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (provisioning / "dashboards" / "jfsync.yaml").read_text(encoding="utf-8")
    )
    folder = provider["providers"][0]["options"]["path"]
    dashboard_mount = next(t for t in mounts if t.startswith(folder + "/"))
    assert (ROOT / mounts[dashboard_mount]).resolve() == DASHBOARD
