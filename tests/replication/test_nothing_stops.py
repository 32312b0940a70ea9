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
from collections.abc import Sequence
from typing import Any

import pytest

from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.wire import UserDto
from jfsync.model import UserData
from jfsync.sync.ledger import Applied, Observation
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import FAST_SUBSCRIBER, Cluster, new_emulator
from tests.support.cluster import StartCluster

pytestmark = pytest.mark.timeout(60)

#: The first retry of a failed bring-up comes within this (1 s, +/- 20 % jitter).
BRING_UP_RETRY_S = 1.5
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
    caplog.set_level(logging.INFO, "jfsync.sync.delivery")
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
    assert len(warnings_from(caplog, "jfsync.sync.delivery", "→b")) == 1
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
    # Logged once with its traceback (below); on /status it is gone once delivery works again:
    # once the write that reached b is recorded (b can hold it a moment before that).
    await cluster.service.wait_for(lambda: pusher.stats.last_error is None, 20)
    assert (await server_status(cluster, "b"))["outbox"]["last_error"] is None
    errors = [
        r for r in caplog.records if r.name == "jfsync.sync.delivery" and r.levelno >= logging.ERROR
    ]
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
    real_compare = ledger.observe_before_writes
    failures: list[float] = []

    # Every round that has rows to deliver compares them (the first one may take the rows
    # its event's apply read, without asking for the due rows).
    async def observe_before_writes(reads: Any, *args: Any, **kwargs: Any) -> Any:
        if any(row.peer == "b" for row, _ in reads) and len(failures) < 4:
            failures.append(clock.monotonic())
            raise sqlite3.OperationalError("database is locked")
        return await real_compare(reads, *args, **kwargs)

    monkeypatch.setattr(ledger, "observe_before_writes", observe_before_writes)
    caplog.set_level(logging.DEBUG, "jfsync.sync.delivery")
    cluster.change(a, x, is_favorite=True)
    shown: list[str | None] = []
    for _ in range(8):
        if cluster.data(b, x) == UserData(favorite=True):
            break
        await cluster.service.wait_for(lambda: bool(failures), 20)
        shown.append((await server_status(cluster, "b"))["outbox"]["last_error"])
        await clock.advance(5.0)
    await cluster.service.wait_for(lambda: cluster.all_hold(x, UserData(favorite=True)), 20)
    assert len(failures) == 4
    # Shown on /status while it lasted, cleared once delivery worked again.
    assert "database is locked" in (shown[0] or "")

    async def cleared() -> bool:
        return (await server_status(cluster, "b"))["outbox"]["last_error"] is None

    # b holds the write as soon as it is made; the pusher records it (and clears the error)
    # right after.
    await cluster.service.wait_for(cleared, 20)
    # One line at WARNING or above for the whole streak, the repeats at DEBUG.
    lines = warnings_from(caplog, "jfsync.sync.delivery", "→b")
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


# ---------------------------------------------------------------------------------- intake


async def test_an_event_the_ledger_fails_to_apply_still_reaches_the_other_server(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    ledger = cluster.service.ledger
    x = cluster.free_items[0]
    real_apply = ledger.apply_observations
    failed: list[str] = []

    async def apply_observations(
        observations: Sequence[Observation], **options: Any
    ) -> list[Applied]:
        if not failed and any(o.source == "event" and o.server == "a" for o in observations):
            failed.append("a")
            raise sqlite3.OperationalError("database is locked")
        return await real_apply(observations, **options)

    monkeypatch.setattr(ledger, "apply_observations", apply_observations)
    # alice favourites x on a; jfsync cannot apply that event (the ledger was locked).
    cluster.change(a, x, is_favorite=True)
    await cluster.wait_all_hold(x, UserData(favorite=True))
    assert failed == ["a"]
    assert cluster.data(b, x) == UserData(favorite=True)
    (user,) = [u for u in (await server_status(cluster, "a"))["users"] if u["user"] == "alice"]
    assert user["event_failures"] == 1
    assert "OperationalError" in user["last_event_error"]
    assert user["state"] == "connected"
    lines = warnings_from(caplog, "jfsync.sync.subscriber", "a/alice")
    assert len(lines) == 1, lines
    assert "database is locked" in lines[0]


# ---------------------------------------------------------------------------------- users


async def test_an_account_created_on_both_servers_after_start_is_synced_without_a_restart(
    make_cluster: MakeCluster,
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(2, clock=clock, sync={"user_refresh_interval": "15s"})
    a, b = cluster.emus
    x = cluster.free_items[0]
    # The admin creates carol on both servers while jfsync runs.
    for emu in (a, b):
        emu.add_user("carol", "secret")
    refreshed = {name: link.users_refreshed_ms for name, link in cluster.service.links.items()}

    await clock.advance(15.0)
    await cluster.wait_connected(users=3)
    assert all(
        link.users_refreshed_ms != refreshed[name] for name, link in cluster.service.links.items()
    )
    # carol favourites x on a; b shows it, and nobody else's data changed.
    cluster.change(a, x, "carol", is_favorite=True)
    await cluster.wait_all_hold(x, UserData(favorite=True), "carol")
    assert cluster.all_hold(x, UserData(), "alice")


async def test_accounts_are_read_again_when_a_server_reconnects(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    x = cluster.free_items[0]
    for emu in (a, b):
        emu.add_user("carol", "secret")
    # Both servers restart their sockets (the default refresh period is far away).
    await a.drop_sockets()
    await b.drop_sockets()
    await cluster.wait_connected(users=3)
    cluster.change(b, x, "carol", rating=8.0)
    await cluster.wait_all_hold(x, UserData(rating=8.0), "carol")


async def test_an_account_removed_from_a_server_is_no_longer_subscribed(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    x = cluster.free_items[0]
    # The admin deletes bob on b: bob has nobody to sync with any more.
    del b.users[b.user_id("bob")]
    await b.drop_sockets()

    def only_alice() -> bool:
        return all(
            [s.user_name for s in link.subscribers.values()] == ["alice"]
            for link in cluster.service.links.values()
        )

    await cluster.service.wait_for(only_alice, 20)
    for name in ("a", "b"):
        assert [u["user"] for u in (await server_status(cluster, name))["users"]] == ["alice"]
    assert any("bob" in line and "no longer synced" in line for line in caplog.messages)
    # alice syncs as before.
    await cluster.wait_connected(users=1)
    cluster.change(a, x, is_favorite=True)
    await cluster.wait_all_hold(x, UserData(favorite=True))


# ---------------------------------------------------------------------------------- bring-up


async def test_a_bring_up_that_fails_unexpectedly_comes_up_on_the_retry(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    real_users = JellyfinClient.users
    failed: list[str] = []

    async def users(self: JellyfinClient) -> list[UserDto]:
        if self.name == "b" and not failed:
            failed.append(self.name)
            raise RuntimeError("a bug while listing users")
        return await real_users(self)

    monkeypatch.setattr(JellyfinClient, "users", users)
    cluster = await make_cluster(2, clock=clock, connect=False)
    a = cluster.emus[0]
    x = cluster.free_items[0]
    link = cluster.service.links["b"]
    await cluster.service.wait_for(lambda: "a bug" in (link.last_error or ""), 20)
    status = await server_status(cluster, "b")
    assert status["reachable"] is False
    assert "RuntimeError: a bug while listing users (retrying in 1 s)" in status["last_error"]

    await clock.advance(BRING_UP_RETRY_S)
    await cluster.wait_connected()
    assert (await server_status(cluster, "b"))["last_error"] is None
    cluster.change(a, x, is_favorite=True)
    await cluster.wait_all_hold(x, UserData(favorite=True))
    assert failed == ["b"]
    lines = warnings_from(caplog, "jfsync.service", "[b]")
    assert len(lines) == 1, lines


async def test_a_server_too_old_to_sync_is_taken_up_once_upgraded_without_a_restart(
    start_cluster: StartCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # b runs Jellyfin 10.8 behind a fixed address; its admin later upgrades it in place
    # (the gate then forwards to a 10.10 server holding the same library).
    clock = ManualClock()
    a = new_emulator("a")
    old_b = new_emulator("b", server_version="10.8.13")
    new_b = new_emulator("b", server_version="10.10.7")
    await start_cluster.start_emulators([a, old_b, new_b])
    gate = await start_cluster.gate(old_b.port)
    # No keepalives while the test moves the clock by minutes.
    options = {**FAST_SUBSCRIBER, "keepalive_interval_s": 3600.0}
    cluster = await start_cluster(
        [a, new_b],
        cls=Cluster,
        url_of=lambda e: gate.url if e is new_b else e.url,
        clock=clock,
        subscriber_options=options,
        connect=False,
    )
    service = cluster.service
    link = service.links["b"]
    await service.wait_for(lambda: "10.8.13" in (link.last_error or ""), 20)
    status = await server_status(cluster, "b")
    assert status["reachable"] is False
    assert "Upgrade the server" in status["last_error"]
    assert "(retrying in 300 s)" in status["last_error"]
    lines = warnings_from(caplog, "jfsync.service", "[b]")
    assert len(lines) == 1, lines

    # The upgrade: the old server stops, the new one answers at the same address.
    gate.upstream_port = new_b.port
    await old_b.stop_listener()
    await clock.advance(300.0)
    await cluster.wait_connected()
    x = cluster.free_items[0]
    cluster.change(a, x, is_favorite=True)
    await cluster.wait_all_hold(x, UserData(favorite=True))
    assert (await server_status(cluster, "b"))["last_error"] is None


async def test_a_user_list_that_cannot_be_read_is_read_again_soon(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(2, clock=clock, sync={"user_refresh_interval": "15s"})
    a, b = cluster.emus
    x = cluster.free_items[0]
    link = cluster.service.links["b"]
    real_users = JellyfinClient.users
    failed: list[str] = []

    async def users(self: JellyfinClient) -> list[UserDto]:
        if self.name == "b" and not failed:
            failed.append(self.name)
            raise sqlite3.OperationalError("database is locked")
        return await real_users(self)

    monkeypatch.setattr(JellyfinClient, "users", users)
    for emu in (a, b):
        emu.add_user("carol", "secret")
    await clock.advance(15.0)
    await cluster.service.wait_for(lambda: link.last_error is not None, 20)
    assert "reading the user list failed" in (await server_status(cluster, "b"))["last_error"]

    await clock.advance(BRING_UP_RETRY_S)
    await cluster.wait_connected(users=3)
    assert (await server_status(cluster, "b"))["last_error"] is None
    cluster.change(a, x, "carol", is_favorite=True)
    await cluster.wait_all_hold(x, UserData(favorite=True), "carol")
    lines = warnings_from(caplog, "jfsync.service", "[b]")
    assert len(lines) == 1, lines
    assert "database is locked" in lines[0]
