"""Progress without a stop reaches the other servers (issue 14 item 6).

Jellyfin saves progress reports without pushing them (fact sheet Corrections 2). jfsync follows
the playback sessions (the ``Sessions`` feed from 10.11, ``GET /Sessions`` on 10.10) and reads
the item when its session ends or goes quiet, and with ``sync.live_progress`` while it plays.
Time is a ManualClock wherever a timeout matters.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from jfsync.sync.sessions import SessionWatcher, WatcherState
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import API_KEY, WAIT_S, Cluster, UserClient, fast_delays

pytestmark = pytest.mark.timeout(60)

#: The Sessions feed's own period is left out of the tests: it sends on every playback event.
SLOW_FEED = {"feed_period_s": 3600.0, "poll_s": 10.0}


def _film(emu: Emulator) -> LibraryItem:
    """A film long enough to keep a resume position (over 5 minutes)."""
    return next(
        i
        for i in emu.leaf_items()
        if i.type == "Movie" and (i.run_time_ticks or 0) > 600 * 10_000_000
    )


def _watcher(cluster: Cluster, server: str) -> SessionWatcher:
    watcher = cluster.service.links[server].sessions
    assert watcher is not None
    return watcher


async def _following(cluster: Cluster, server: str) -> SessionWatcher:
    """The server's watcher once it took a session list and waits for the next one."""
    watcher = _watcher(cluster, server)
    async with asyncio.timeout(WAIT_S):
        await watcher.wait_for_state(WatcherState.FOLLOWING)
        await watcher.wait_for_updates(watcher.tracker.updates)
    return watcher


async def _report(
    watcher: SessionWatcher, player: UserClient, path: str, body: dict[str, object]
) -> None:
    """Send one playback report; wait until the watcher shows the session where it said."""
    assert await player.call("POST", path, body) == 204
    item, position = str(body["ItemId"]), body.get("PositionTicks", 0)
    async with asyncio.timeout(WAIT_S):
        await watcher.wait_until(
            lambda: watcher.tracker.position_of(player.user_id, item) == position
        )


async def test_a_player_that_crashes_mid_film_leaves_its_position_everywhere_after_the_quiet_time(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(
        2,
        clock=clock,
        server_version="10.11.11",
        sync={"session_quiet": "20s"},
        session_options=SLOW_FEED,
    )
    a, b = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    watcher = await _following(cluster, "a")
    assert watcher.mode == "socket"
    player = UserClient(http, a)
    await _report(watcher, player, "/Sessions/Playing", {"ItemId": film.id})
    await cluster.settle()
    # 40 % in, the player reports its position (saved on a, pushed nowhere), then crashes.
    position = film.run_time_ticks * 2 // 5
    progress = {"ItemId": film.id, "PositionTicks": position}
    await _report(watcher, player, "/Sessions/Playing/Progress", progress)
    assert cluster.data(a, film.id).play_state.position_ticks == position
    assert cluster.data(b, film.id).play_state.position_ticks == 0

    # No report for the quiet time: jfsync reads a, and b can resume where the crash was.
    await clock.advance(20.0)
    await cluster.service.wait_for(
        lambda: cluster.data(b, film.id).play_state.position_ticks == position, WAIT_S
    )
    await cluster.wait_all_hold(film.id, cluster.data(a, film.id))
    assert watcher.status.reads >= 1


async def test_a_session_that_vanishes_past_90_percent_leaves_the_film_played_everywhere(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, server_version="10.11.11", session_options=SLOW_FEED)
    a, _ = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    watcher = await _following(cluster, "a")
    player = UserClient(http, a)
    await _report(watcher, player, "/Sessions/Playing", {"ItemId": film.id})
    near_end = {"ItemId": film.id, "PositionTicks": film.run_time_ticks * 95 // 100}
    await _report(watcher, player, "/Sessions/Playing/Progress", near_end)
    watched = cluster.data(a, film.id)
    assert watched.play_state.played  # saved by the progress report, never pushed
    # The player's session ends without a stop (its app was closed, its token revoked).
    assert await player.call("POST", "/Sessions/Logout") == 204
    # No time passes: the session's end is enough.
    await cluster.wait_all_hold(film.id, watched)


async def test_live_progress_lets_the_user_continue_on_the_other_server_mid_film(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(
        2,
        clock=clock,
        server_version="10.11.11",
        sync={"live_progress": "15s", "session_quiet": "10m"},
        session_options=SLOW_FEED,
    )
    a, b = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    watcher = await _following(cluster, "a")
    player = UserClient(http, a)
    await _report(watcher, player, "/Sessions/Playing", {"ItemId": film.id})
    await cluster.settle()
    # The film plays on: the player reports 25 %, then 50 %.
    for share in (4, 2):
        position = film.run_time_ticks // share
        progress = {"ItemId": film.id, "PositionTicks": position}
        await _report(watcher, player, "/Sessions/Playing/Progress", progress)
        await clock.advance(15.0)
        # b shows where the film is, while it still plays on a.
        await cluster.service.wait_for(
            lambda position=position: (
                cluster.data(b, film.id).play_state.position_ticks == position
            ),
            WAIT_S,
        )
        assert not cluster.data(b, film.id).play_state.played
    assert watcher.status.playing == 1


async def test_on_10_10_sessions_are_read_over_rest_and_a_vanished_session_is_caught(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(
        2, clock=clock, server_version="10.10.7", session_options=SLOW_FEED
    )
    a, b = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    watcher = await _following(cluster, "a")
    # 10.10 refuses the Sessions feed to an API key (fact sheet §1.5): GET /Sessions instead.
    assert watcher.mode == "poll"
    player = UserClient(http, a)
    assert await player.call("POST", "/Sessions/Playing", {"ItemId": film.id}) == 204
    seen = watcher.tracker.updates
    await clock.advance(10.0)
    async with asyncio.timeout(WAIT_S):
        await watcher.wait_for_updates(seen + 1)
    assert watcher.status.playing == 1
    position = film.run_time_ticks // 3
    progress = {"ItemId": film.id, "PositionTicks": position}
    assert await player.call("POST", "/Sessions/Playing/Progress", progress) == 204
    assert await player.call("POST", "/Sessions/Logout") == 204

    # The next poll finds the session gone and reads a.
    await clock.advance(10.0)
    await cluster.service.wait_for(
        lambda: cluster.data(b, film.id).play_state.position_ticks == position, WAIT_S
    )
    status = await cluster.service.status()
    sessions = next(s for s in status["servers"] if s["name"] == "a")["sessions"]
    assert sessions["mode"] == "poll"
    assert sessions["state"] == "following"
    assert sessions["playing"] == 0


async def test_the_watcher_reconnects_and_still_reads_a_session_that_ended(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(
        2,
        server_version="10.11.11",
        session_options={**SLOW_FEED, "delays": fast_delays},
    )
    a, b = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    watcher = await _following(cluster, "a")
    player = UserClient(http, a)
    await _report(watcher, player, "/Sessions/Playing", {"ItemId": film.id})
    position = film.run_time_ticks // 2
    progress = {"ItemId": film.id, "PositionTicks": position}
    await _report(watcher, player, "/Sessions/Playing/Progress", progress)
    # a drops every socket (a restart of its proxy); the player's app is closed meanwhile.
    await a.drop_sockets()
    assert await player.call("POST", "/Sessions/Logout") == 204
    await cluster.service.wait_for(
        lambda: cluster.data(b, film.id).play_state.position_ticks == position, WAIT_S
    )
    await _following(cluster, "a")
    assert watcher.status.playing == 0


async def test_a_server_restart_mid_film_is_shown_and_the_lost_session_is_read_after_it(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(
        2,
        server_version="10.11.11",
        session_options={**SLOW_FEED, "delays": fast_delays},
    )
    a, b = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    watcher = await _following(cluster, "a")
    player = UserClient(http, a)
    await _report(watcher, player, "/Sessions/Playing", {"ItemId": film.id})
    position = film.run_time_ticks * 3 // 5
    progress = {"ItemId": film.id, "PositionTicks": position}
    await _report(watcher, player, "/Sessions/Playing/Progress", progress)

    # a goes down (its sessions with it): status says why jfsync cannot follow it.
    await a.stop_listener()
    async with asyncio.timeout(WAIT_S):
        await watcher.wait_for_state(WatcherState.BACKOFF)
    status = await cluster.service.status()
    sessions = next(s for s in status["servers"] if s["name"] == "a")["sessions"]
    assert sessions["state"] in ("backoff", "connecting")
    assert sessions["last_error"]
    assert API_KEY not in str(status)

    # a is back without the player's session: its position reaches b.
    await a.start_listener()
    await cluster.service.wait_for(
        lambda: cluster.data(b, film.id).play_state.position_ticks == position, WAIT_S
    )
    async with asyncio.timeout(WAIT_S):
        await watcher.wait_for_state(WatcherState.FOLLOWING)
    assert watcher.status.last_error is None
