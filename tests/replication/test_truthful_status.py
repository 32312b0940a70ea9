"""Status and log messages say what is true (issue 12, item 4).

A refused API key is not "cannot reach"; a server reached once and down now is not "not
reached yet"; an error that has ended leaves no trace on ``/status``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from jfsync.model import UserData
from jfsync.ops.statuscmd import render
from jfsync.service import SyncService
from tests.replication.conftest import MakeCluster
from tests.replication.harness import API_KEY, WAIT_S, Cluster, new_emulator
from tests.support.cluster import StartCluster

pytestmark = pytest.mark.timeout(60)


async def server_status(service: SyncService, name: str) -> dict[str, Any]:
    """The status snapshot of one server."""
    status = await service.status()
    server: dict[str, Any] = next(s for s in status["servers"] if s["name"] == name)
    return server


async def test_a_refused_api_key_is_named_as_such_not_as_unreachable(
    start_cluster: StartCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a, b = new_emulator("a"), new_emulator("b")
    cluster = await start_cluster([a, b], api_key={"a": API_KEY, "b": "f" * 32}, connect=False)
    service = cluster.service

    async def refused() -> bool:
        error = (await server_status(service, "b"))["last_error"] or ""
        return "refused the API key" in error

    await service.wait_for(refused, WAIT_S)
    server = await server_status(service, "b")
    assert server["reachable"] is False
    assert "servers[1].api_key" in server["last_error"]
    assert "f" * 32 not in server["last_error"]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("API key refused" in line for line in lines), lines
    assert not any("cannot reach" in line and "[b]" in line for line in lines), lines


async def test_a_server_down_after_it_was_reached_is_not_called_never_reached(
    make_cluster: MakeCluster,
) -> None:
    cluster: Cluster = await make_cluster(2)
    a, b = cluster.emus
    item = cluster.free_items[0]
    await b.stop_listener()
    cluster.change(a, item, is_favorite=True)
    pusher = cluster.service.links["b"].pusher
    await cluster.service.wait_for(lambda: pusher.stats.down_since_ms is not None, WAIT_S)
    text, _ = render(await cluster.service.status())
    assert "not reached yet" not in text
    assert "peer b is down for writes" in text

    # Back up: the favourite arrives and the error that made it "down" is gone from status.
    await b.start_listener()
    await cluster.wait_all_hold(item, UserData(favorite=True))
    server = await server_status(cluster.service, "b")
    assert server["outbox"]["down_since_ms"] is None
    assert server["outbox"]["last_error"] is None
    text, _ = render(await cluster.service.status())
    assert "down for writes" not in text
