"""A server that comes back with a user's data gone never wipes that user's data elsewhere.

Each test is a story: alice builds a library of favourites, plays, ratings and resume points
that jfsync syncs to every server; then server b goes down and comes back having lost her data
(``Emulator.wipe_user_data``: same server and user ids, nothing pushed), or she clears a few
items herself while b's socket is down, or b is replaced by a new server. The reset guard must
tell the lost server from her own edits (jfsync.sync.resetguard).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jfsync.config import parse_config
from jfsync.errors import ConfigError
from jfsync.model import DEFAULT_USER_DATA, UserData
from jfsync.ops.metrics import Metrics
from jfsync.ops.status import StatusServer
from jfsync.ops.statuscmd import find_problems
from jfsync.service import SyncService
from tests.replication.conftest import MakeCluster
from tests.replication.harness import (
    USER,
    USER_KEY,
    WAIT_S,
    Cluster,
    new_emulator,
)
from tests.support.config import write_config

pytestmark = pytest.mark.timeout(90)

#: alice's library: this many items with data of every kind.
LIBRARY = 34
WIPE_LOG = "lost this user's data"
BASE = datetime(2026, 11, 1, 20, 0, tzinfo=UTC)


def library_change(n: int) -> dict[str, Any]:
    """The n-th item of alice's library: favourites, plays, ratings, resume points, mixed."""
    when = BASE + timedelta(hours=n)
    kinds: list[dict[str, Any]] = [
        {"is_favorite": True},
        {"played": True, "play_count": 2, "last_played": when},
        {"rating": 8.0},
        {"position_ticks": 12_000_000_000 + n, "last_played": when},
        {"is_favorite": True, "played": True, "play_count": 1, "last_played": when, "rating": 6.0},
    ]
    return kinds[n % len(kinds)]


async def build_library(cluster: Cluster, count: int = LIBRARY) -> dict[str, UserData]:
    """alice acts on server a; wait until every server shows it; return what she holds."""
    a = cluster.emu("a")
    items = cluster.free_items[:count]
    for n, item in enumerate(items):
        cluster.change(a, item, **library_change(n))
    expected = {item: cluster.data(a, item) for item in items}
    assert all(not state.is_default for state in expected.values())
    await converged(cluster, "b", expected)
    return expected


def holds(cluster: Cluster, server: str, expected: dict[str, UserData]) -> bool:
    """Tell whether ``server`` shows alice every expected state."""
    emu = cluster.emu(server)
    return all(cluster.data(emu, item) == state for item, state in expected.items())


def link_state(cluster: Cluster, server: str, user: str = USER) -> str:
    link = cluster.service.links[server]
    sub = next(s for s in link.subscribers.values() if s.user_name == user)
    return str(sub.status.state)


async def restart(cluster: Cluster, **sync: Any) -> SyncService:
    """Stop jfsync and start it again on the same ledger, with ``sync`` keys changed."""
    old = cluster.service
    await cluster.stop_service()
    config = old.config.model_copy(update={"sync": old.config.sync.model_copy(update=sync)})
    return await cluster.start_service(config=config)


async def converged(cluster: Cluster, server: str, expected: dict[str, UserData]) -> None:
    """Wait until ``server`` shows ``expected`` and jfsync's writes echoed back, then settle.

    Settling at once could merge alice's sentinel with the echo of a write still on its way
    (the emulator pushes once per debounce window), leaving that echo pending for a minute.
    """
    await cluster.service.wait_for(lambda: holds(cluster, server, expected), WAIT_S)
    await cluster.wait_quiet(cluster.items)
    await cluster.settle()


def alice_writes(cluster: Cluster, server: str) -> list[Any]:
    """Successful user-data writes jfsync made to ``server`` for alice."""
    emu = cluster.emu(server)
    return [w for w in cluster.writes(emu) if w.user_id == emu.user_id(USER)]


async def take_down(cluster: Cluster, server: str) -> None:
    """Stop ``server`` and wait until jfsync saw its sockets close."""
    await cluster.emu(server).stop_listener()
    await cluster.service.wait_for(lambda: link_state(cluster, server) != "connected", WAIT_S)


async def bring_back(cluster: Cluster, server: str) -> None:
    """Start ``server`` again and wait until every socket is up and caught up, then settle."""
    await cluster.emu(server).start_listener()
    await cluster.wait_connected()
    # The catch-up's writes echo back before alice's settle sentinels go out.
    await cluster.wait_quiet(cluster.items)
    await cluster.settle()


def wipe_alice(cluster: Cluster, server: str) -> None:
    emu = cluster.emu(server)
    assert emu.wipe_user_data(emu.user_id(USER)) >= LIBRARY


def wipe_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.levelno == logging.WARNING and WIPE_LOG in r.getMessage()
    ]


def metric_value(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_server_back_with_alices_data_wiped_is_restored_and_never_wipes_a(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2, leaves=60)
    expected = await build_library(cluster)

    await take_down(cluster, "b")
    wipe_alice(cluster, "b")
    caplog.set_level(logging.WARNING)
    await cluster.emu("b").start_listener()
    await cluster.wait_connected()

    # a still shows every value alice had, and b shows them again.
    assert holds(cluster, "a", expected)
    await converged(cluster, "b", expected)
    assert holds(cluster, "a", expected)
    assert holds(cluster, "b", expected)
    # One warning, naming the server, the user and the count.
    warnings = wipe_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    message = warnings[0].getMessage()
    assert "[b]" in message
    assert "alice" in message
    assert "RESTORING" in message
    # The status page shows it, `jfsync status` lists it, the metric moved.
    snapshot = await cluster.service.status()
    triggers = snapshot["reset_guard"]["triggers"]
    assert [(t["server"], t["user"], t["items"], t["action"]) for t in triggers] == [
        ("b", USER, LIBRARY + 2, "restored")  # the settle sentinels are hers too
    ]
    assert any("b lost user alice's data" in p.text for p in find_problems(snapshot))
    text = Metrics(["a", "b"]).render(snapshot).decode()
    assert (
        metric_value(text, 'jfsync_reset_guard_triggers_total{action="restored",server="b"}') == 1
    )
    assert metric_value(text, 'jfsync_reset_holds{server="b"}') == 0


async def test_a_small_library_wiped_whole_is_restored_too(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(2, leaves=30)
    # Eight films: above the 5-item floor, and all of them are 100 % of her items on b.
    expected = await build_library(cluster, count=8)

    await take_down(cluster, "b")
    emu = cluster.emu("b")
    emu.wipe_user_data(emu.user_id(USER))
    await bring_back(cluster, "b")

    await converged(cluster, "b", expected)
    assert holds(cluster, "a", expected)
    assert holds(cluster, "b", expected)


async def test_a_few_items_unplayed_on_b_while_its_socket_was_down_still_propagate(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2, leaves=60)
    expected = await build_library(cluster)
    b = cluster.emu("b")
    # Items 1, 6 and 11 are played (play count 2): unplaying them leaves them untouched.
    unplayed = [cluster.free_items[n] for n in (1, 6, 11)]

    await take_down(cluster, "b")
    for item in unplayed:
        cluster.change(b, item, played=False, play_count=0, clear_last_played=True)
        assert cluster.data(b, item) == DEFAULT_USER_DATA
    caplog.set_level(logging.WARNING)
    await bring_back(cluster, "b")

    # Her unplays are her edits: a shows them, and every other item is as she left it.
    for item in unplayed:
        assert cluster.data(cluster.emu("a"), item) == DEFAULT_USER_DATA
        assert cluster.data(b, item) == DEFAULT_USER_DATA
    rest = {i: s for i, s in expected.items() if i not in unplayed}
    assert holds(cluster, "a", rest)
    assert holds(cluster, "b", rest)
    assert not wipe_warnings(caplog)
    assert (await cluster.service.status())["reset_guard"]["triggers"] == []


async def test_unplaying_a_whole_season_while_the_socket_was_down_is_not_taken_for_a_wipe(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2, leaves=130)
    a, b = cluster.emu("a"), cluster.emu("b")
    # 110 watched episodes; then she unplays a 22-episode season on b while jfsync's socket
    # there is down (22 items back to never touched: above the 5-item floor, but 20 % of
    # her items, far below the 80 % a wipe shows).
    watched = cluster.free_items[:110]
    for n, item in enumerate(watched):
        cluster.change(a, item, played=True, play_count=1, last_played=BASE + timedelta(hours=n))
    expected = {item: cluster.data(a, item) for item in watched}
    await converged(cluster, "b", expected)
    season = watched[40:62]

    await take_down(cluster, "b")
    for item in season:
        cluster.change(b, item, played=False, play_count=0, clear_last_played=True)
    caplog.set_level(logging.WARNING)
    await bring_back(cluster, "b")

    for item in season:
        assert cluster.data(a, item) == DEFAULT_USER_DATA
        assert cluster.data(b, item) == DEFAULT_USER_DATA
    rest = {i: s for i, s in expected.items() if i not in season}
    assert holds(cluster, "a", rest)
    assert holds(cluster, "b", rest)
    assert not wipe_warnings(caplog)


async def held_wipe(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> dict[str, UserData]:
    """With sync.reset_guard: hold, alice's library, then b down, wiped and back: held.

    Checks that nothing was written to b for alice from the wipe on.
    """
    await restart(cluster, reset_guard="hold")
    expected = await build_library(cluster)
    await take_down(cluster, "b")
    wipe_alice(cluster, "b")
    writes = len(alice_writes(cluster, "b"))
    caplog.set_level(logging.WARNING)
    await cluster.emu("b").start_listener()
    await cluster.wait_connected()
    # alice is held on b, so her sentinels cannot go round: bob's show everything is quiet.
    await cluster.settle(user="bob")
    assert len(alice_writes(cluster, "b")) == writes
    return expected


async def test_hold_leaves_both_servers_untouched_across_a_restart_then_accept_takes_b(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2, leaves=60)
    expected = await held_wipe(cluster, caplog)
    a, b = cluster.emu("a"), cluster.emu("b")
    writes_before = len(alice_writes(cluster, "b"))

    # Nothing moved: a keeps her library, b keeps what it holds (nothing written to it).
    assert holds(cluster, "a", expected)
    assert all(cluster.data(b, i) == DEFAULT_USER_DATA for i in expected)
    warnings = wipe_warnings(caplog)
    assert len(warnings) == 1
    assert "HOLDING" in warnings[0].getMessage()
    assert "jfsync accept-reset b --user alice" in warnings[0].getMessage()
    snapshot = await cluster.service.status()
    assert [(h["server"], h["user"]) for h in snapshot["reset_guard"]["holds"]] == [("b", USER)]
    assert any(p.blocking and "HELD" in p.text for p in find_problems(snapshot))
    text = Metrics(["a", "b"]).render(snapshot).decode()
    assert metric_value(text, 'jfsync_reset_holds{server="b"}') == 1
    assert metric_value(text, 'jfsync_reset_guard_triggers_total{action="held",server="b"}') == 1

    # While held, what she does on b is not synced.
    on_b, on_a = cluster.free_items[40], cluster.free_items[41]
    cluster.change(b, on_b, is_favorite=True)
    await cluster.settle(user="bob")
    assert cluster.data(a, on_b) == DEFAULT_USER_DATA

    # The hold survives a restart.
    await restart(cluster, reset_guard="hold")
    await cluster.settle(user="bob")
    assert cluster.data(a, on_b) == DEFAULT_USER_DATA
    assert [
        (h["server"], h["user"]) for h in (await cluster.service.status())["reset_guard"]["holds"]
    ] == [("b", USER)]
    assert holds(cluster, "a", expected)
    assert len(alice_writes(cluster, "b")) == writes_before
    # What she does on a is kept, owed to b, and not written there while held.
    cluster.change(a, on_a, rating=9.0)
    ledger = cluster.service.ledger

    async def owed_to_b() -> bool:
        return await ledger.get_row("b", USER_KEY, on_a) is not None

    await cluster.service.wait_for(owed_to_b, WAIT_S)
    assert cluster.data(b, on_a) == DEFAULT_USER_DATA
    assert len(alice_writes(cluster, "b")) == writes_before

    # The operator accepts b's state: it is alice's now, on every server.
    result = await cluster.service.accept_reset("b", USER)
    assert len(result["applied"]) == 1
    await cluster.wait_quiet(cluster.items)
    await cluster.settle()
    for item in expected:
        assert cluster.data(a, item) == DEFAULT_USER_DATA
        assert cluster.data(b, item) == DEFAULT_USER_DATA
    # What she did during the hold is synced now, both ways.
    assert cluster.data(a, on_b).favorite
    assert cluster.data(b, on_a).rating == 9.0
    assert (await cluster.service.status())["reset_guard"]["holds"] == []


async def test_hold_resolved_by_restoring_writes_a_state_back_to_b(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2, leaves=60)
    expected = await held_wipe(cluster, caplog)

    result = await cluster.service.accept_reset("b", USER, restore=True)
    assert len(result["applied"]) == 1
    await converged(cluster, "b", expected)
    assert holds(cluster, "a", expected)
    assert holds(cluster, "b", expected)
    assert (await cluster.service.status())["reset_guard"]["holds"] == []


async def test_b_replaced_by_a_new_server_is_merged_at_first_contact_not_reset(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2, leaves=60)
    expected = await build_library(cluster)
    a, old_b = cluster.emu("a"), cluster.emu("b")
    await cluster.service.stop()
    await old_b.close()
    # A fresh install behind b's URL: a new server id, alice's library not there, and a
    # favourite and a rating she gave on it before jfsync came back.
    new_b = new_emulator("b", 60, port=old_b.port, server_id="0f" * 16)
    assert new_b.server_id != old_b.server_id
    await new_b.start()
    try:
        cluster.emus[1] = new_b
        fav, rated = cluster.free_items[40], cluster.free_items[41]
        cluster.change(new_b, fav, is_favorite=True)
        cluster.change(new_b, rated, rating=7.0)
        caplog.set_level(logging.WARNING)
        service = await cluster.start_service()
        await converged(cluster, "b", expected)

        # First contact: a keeps all of her library, b gets it, and what b had joins in.
        assert holds(cluster, "a", expected)
        assert holds(cluster, "b", expected)
        assert cluster.data(a, fav).favorite
        assert cluster.data(a, rated).rating == 7.0
        # Not a wipe: a new server.
        guard = (await service.status())["reset_guard"]
        assert guard["triggers"] == []
        assert guard["holds"] == []
        assert not wipe_warnings(caplog)
        assert any("server id changed" in r.getMessage() for r in caplog.records)
    finally:
        await cluster.service.stop()
        await new_b.close()


async def accept_reset_cli(config_file: Path, *args: str) -> tuple[int | None, str, str]:
    """Run ``python -m jfsync accept-reset *args --config FILE``; status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jfsync",
        "accept-reset",
        *args,
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S):
        out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def test_accept_reset_command_with_jfsync_running_and_stopped(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    cluster = await make_cluster(2, leaves=60)
    expected = await held_wipe(cluster, caplog)
    a, b = cluster.emu("a"), cluster.emu("b")
    config_file = write_config(
        tmp_path / "jfsync.yaml",
        cluster.emus,
        ledger=cluster.service.config.ledger,
        timeout_s=5,
        logging={"level": "warning"},
        sync={"shutdown_grace": 5.0},
    )

    # Bad arguments: one clear line, exit 2.
    status, out, err = await accept_reset_cli(config_file, "nosuch")
    assert status == 2
    assert err.strip().splitlines() == [
        f"jfsync accept-reset: no server 'nosuch' in {config_file}; expected one of a, b"
    ]
    status, out, err = await accept_reset_cli(config_file, "b", "--user", " ")
    assert status == 2
    assert len(err.strip().splitlines()) == 1

    # jfsync is running: the ledger is busy, so the command goes through the status endpoint
    # (with its token), and the running service applies the restore at once.
    token = "status-token-for-the-reset-test"
    server = StatusServer(cluster.service, host="127.0.0.1", port=0, token=token)
    await server.start()
    try:
        status, out, err = await accept_reset_cli(
            config_file, "b", "--user", "nobody", "--url", server.url, "--token", token
        )
        assert status == 1, (out, err)
        assert "nothing is held on b for user nobody" in out
        status, out, err = await accept_reset_cli(
            config_file, "b", "--user", "alice", "--restore", "--url", server.url, "--token", token
        )
        assert status == 0, (out, err)
        assert "applied now" in out
        assert token not in out + err
    finally:
        await server.stop()
    await converged(cluster, "b", expected)
    assert holds(cluster, "a", expected)

    # Held again (b wiped again), with jfsync stopped: the command decides in the ledger and
    # the next run applies it (accept: b's state is alice's).
    await take_down(cluster, "b")
    wipe_alice(cluster, "b")
    await b.start_listener()
    await cluster.wait_connected()
    await cluster.settle(user="bob")
    assert holds(cluster, "a", expected)
    await cluster.service.stop()
    status, out, err = await accept_reset_cli(config_file, "b", "--user", "alice")
    assert status == 0, (out, err)
    assert "jfsync is not running" in out
    await restart(cluster, reset_guard="hold")
    await cluster.wait_quiet(cluster.items)
    await cluster.settle()
    for item in expected:
        assert cluster.data(a, item) == DEFAULT_USER_DATA
        assert cluster.data(b, item) == DEFAULT_USER_DATA
    await cluster.service.stop()
    status, out, err = await accept_reset_cli(config_file, "b")
    assert status == 1
    assert "nothing is held on b" in out


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            "reset_guard: keep",
            "sync.reset_guard: 'keep' is not accepted; expected 'restore', 'hold' or 'off'",
        ),
        (
            "reset_guard_min_items: 0",
            "sync.reset_guard_min_items: not a positive whole number (0); expected the smallest "
            "count of items that can be a lost server, e.g. 5",
        ),
        (
            "reset_guard_fraction: 80",
            "sync.reset_guard_fraction: not a fraction (80); expected a number above 0 and at "
            "most 1, e.g. 0.8 (80 % of the user's items)",
        ),
    ],
)
def test_a_bad_reset_guard_setting_names_the_key_and_the_fix(line: str, problem: str) -> None:
    text = (
        "servers:\n"
        "  - {name: a, url: 'http://127.0.0.1:1', api_key: k}\n"
        "  - {name: b, url: 'http://127.0.0.1:2', api_key: k}\n"
        f"sync:\n  {line}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text)
    assert raised.value.problems == [problem]
