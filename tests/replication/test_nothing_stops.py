"""Nothing stops while jfsync runs: every background task outlives the failures it meets.

Each test makes one of jfsync's tasks meet a failure that used to end it for good (a proxy
answering 404 for a stopped server, a ledger error, an event that cannot be applied, a
bring-up that fails in an unexpected way, accounts created after start), then checks what the
user notices: the change they made still reaches every server once the condition ends, and the
failure was shown on the status snapshot and logged once.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import Any

import pytest

from jfsync.model import UserData
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import Cluster

pytestmark = pytest.mark.timeout(60)

#: How long a paused pusher waits before asking the peer again (on the ManualClock).
AUTH_RETRY_S = 60.0
#: What a reverse proxy answers for a stopped server: nginx, traefik once the container is
#: gone, and a maintenance page (a 200 that is not Jellyfin's JSON).
BAD_GATEWAY = (502, "<html><body><h1>502 Bad Gateway</h1></body></html>")
PROXY_ANSWERS = {
    "proxy-404": (404, "404 page not found"),
    "maintenance-page": (200, "<html><body>Down for maintenance</body></html>"),
}


async def server_status(cluster: Cluster, name: str) -> dict[str, Any]:
    """The status snapshot of one server."""
    status = await cluster.service.status()
    server: dict[str, Any] = next(s for s in status["servers"] if s["name"] == name)
    return server


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str, subject: str) -> list[str]:
    """WARNING and ERROR lines of ``logger`` that name ``subject``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and r.levelno >= logging.WARNING and subject in r.getMessage()
    ]


# ---------------------------------------------------------------------------------- pusher


@pytest.mark.parametrize("answer", list(PROXY_ANSWERS.values()), ids=list(PROXY_ANSWERS))
async def test_a_peer_whose_proxy_answers_for_it_while_down_gets_the_favourite_once_back(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture, answer: tuple[int, str]
) -> None:
    caplog.set_level(logging.INFO, "jfsync.pusher")
    cluster = await make_cluster(2, gated=("b",))
    a, b = cluster.emus
    gate = cluster.gates["b"]
    pusher = cluster.service.links["b"].pusher
    x = cluster.free_items[0]

    # b stops; its proxy answers 502 meanwhile, so b counts as down and is probed.
    gate.down_answer = BAD_GATEWAY
    await b.stop_listener()
    cluster.change(a, x, is_favorite=True)
    await gate.wait_down_answered("/System/Info/Public", 1)
    # Then the proxy answers something that is not Jellyfin (its container is gone).
    gate.down_answer = answer
    gate.down_answered.clear()
    await gate.wait_down_answered("/System/Info/Public", 3)

    outbox = (await server_status(cluster, "b"))["outbox"]
    assert outbox["down_since_ms"] is not None
    assert outbox["depth"] == 1
    assert "/System/Info/Public" in outbox["last_error"]
    assert cluster.data(b, x) == UserData()

    await b.start_listener()
    await cluster.service.wait_for(lambda: cluster.all_hold(x, UserData(favorite=True)), 20)
    assert pusher.stats.down_since_ms is None
    # One line for the whole outage (the probes' answers are DEBUG), one for the return.
    assert len(warnings_from(caplog, "jfsync.pusher", "→b")) == 1
    assert any("peer reachable again" in r.getMessage() for r in caplog.records)


async def test_a_paused_peer_whose_proxy_answers_404_stays_paused_and_resumes(
    make_cluster: MakeCluster,
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(
        2, clock=clock, gated=("b",), pusher_options={"auth_retry_s": AUTH_RETRY_S}
    )
    a, b = cluster.emus
    gate = cluster.gates["b"]
    pusher = cluster.service.links["b"].pusher
    x = cluster.free_items[0]

    # b refuses jfsync's key: the favourite waits, the peer is paused.
    b.fail_next_writes(1000, 401)
    cluster.change(a, x, is_favorite=True)
    await cluster.service.wait_for(lambda: pusher.stats.pause_reason is not None, 20)

    # While paused, b stops behind a proxy that answers 404 for it.
    gate.down_answer = PROXY_ANSWERS["proxy-404"]
    await b.stop_listener()
    await clock.advance(AUTH_RETRY_S)
    await gate.wait_down_answered("/System/Info", 1)
    await cluster.service.wait_for(lambda: "404" in (pusher.stats.last_error or ""), 20)
    outbox = (await server_status(cluster, "b"))["outbox"]
    assert outbox["pause_reason"] is not None
    assert outbox["depth"] == 1

    # b is back and takes the key again: the next ask resumes delivery.
    await b.start_listener()
    b.fail_next_writes(0)
    await clock.advance(AUTH_RETRY_S)
    await cluster.service.wait_for(lambda: cluster.all_hold(x, UserData(favorite=True)), 20)
    assert pusher.stats.pause_reason is None


async def test_a_ledger_error_when_the_peer_returns_does_not_stop_its_delivery(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    ledger = cluster.service.ledger
    pusher = cluster.service.links["b"].pusher
    x = cluster.free_items[0]
    real_reset_backoff = ledger.reset_backoff
    failed: list[str] = []

    async def reset_backoff(peer: str) -> int:
        if peer == "b" and not failed:
            failed.append(peer)
            raise sqlite3.OperationalError("database is locked")
        return await real_reset_backoff(peer)

    monkeypatch.setattr(ledger, "reset_backoff", reset_backoff)
    await b.stop_listener()
    cluster.change(a, x, is_favorite=True)
    await cluster.service.wait_for(lambda: pusher.stats.down_since_ms is not None, 20)
    # b returns; recording that fails once (the ledger was locked).
    await b.start_listener()
    await cluster.service.wait_for(lambda: cluster.all_hold(x, UserData(favorite=True)), 20)
    assert failed == ["b"]
    assert "database is locked" in (await server_status(cluster, "b"))["outbox"]["last_error"]
    errors = [r for r in caplog.records if r.name == "jfsync.pusher" and r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "delivery round failed unexpectedly" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the traceback, for a bug report


async def test_a_ledger_failing_round_after_round_is_logged_once_and_retried_with_backoff(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(
        2, clock=clock, pusher_options={"fault_initial_s": 1.0, "fault_max_s": 4.0}
    )
    a, b = cluster.emus
    ledger = cluster.service.ledger
    x = cluster.free_items[0]
    real_due_rows = ledger.due_rows
    failures: list[float] = []

    async def due_rows(peer: str, *args: Any, **kwargs: Any) -> Any:
        if peer == "b" and len(failures) < 4:
            failures.append(clock.monotonic())
            raise sqlite3.OperationalError("database is locked")
        return await real_due_rows(peer, *args, **kwargs)

    monkeypatch.setattr(ledger, "due_rows", due_rows)
    caplog.set_level(logging.DEBUG, "jfsync.pusher")
    cluster.change(a, x, is_favorite=True)
    for _ in range(8):
        if cluster.data(b, x) == UserData(favorite=True):
            break
        await cluster.service.wait_for(lambda: bool(failures), 20)
        await clock.advance(5.0)
    await cluster.service.wait_for(lambda: cluster.all_hold(x, UserData(favorite=True)), 20)
    assert len(failures) == 4
    assert "database is locked" in (await server_status(cluster, "b"))["outbox"]["last_error"]
    # One line at WARNING or above for the whole streak, the repeats at DEBUG.
    lines = warnings_from(caplog, "jfsync.pusher", "→b")
    assert len(lines) == 1, lines
    assert "database is locked" in lines[0]
    assert any("delivery rounds work again" in r.getMessage() for r in caplog.records)
    # Capped exponential backoff on the injected clock: about 1, 2, 4, 4 s.
    delays = [
        float(m.group(1))
        for r in caplog.records
        if (
            m := re.search(
                r"delivery round failed unexpectedly; retrying in ([0-9.]+) s", r.getMessage()
            )
        )
    ]
    assert len(delays) == 4, delays
    assert delays[0] < delays[1] < delays[2], delays
    assert max(delays) <= 4.0, delays
