"""Rewatch protection as the user sees it (issue 14 item 5).

Up to 10.11, starting a played film un-plays it on that server (PlayCount + 1), and stopping
early leaves it unplayed (Jellyfin issues 7535 and 14351; fact sheet Corrections 3). jfsync
keeps it played on the other servers while the rewatch is under way, spreads an explicit
"mark unplayed" at once, and spreads the finished rewatch as the server shows it. From 12.0 a
start keeps Played and everything spreads as it is.
"""

from __future__ import annotations

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from jfsync.model import PlayState
from tests.replication.conftest import MakeCluster
from tests.replication.harness import Cluster, UserClient

pytestmark = pytest.mark.timeout(60)


def _film(emu: Emulator) -> LibraryItem:
    """A film long enough to keep a resume position (over 5 minutes)."""
    return next(
        i
        for i in emu.leaf_items()
        if i.type == "Movie" and (i.run_time_ticks or 0) > 600 * 10_000_000
    )


async def _watched_everywhere(cluster: Cluster, player: UserClient, film: LibraryItem) -> None:
    """The user marks the film played on a; every server shows it played once."""
    assert await player.call("POST", f"/UserPlayedItems/{film.id}") == 200
    watched = cluster.data(cluster.emus[0], film.id)
    assert watched.play_state.played
    assert watched.play_state.play_count == 1
    await cluster.wait_all_hold(film.id, watched)


async def test_a_rewatch_stopped_early_stays_played_elsewhere_until_marked_unplayed(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, server_version="10.11.11")
    a, b = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    player = UserClient(http, a)
    await _watched_everywhere(cluster, player, film)

    # The user starts watching it again on a: 10.11 shows it unplayed, PlayCount 2.
    assert await player.call("POST", "/Sessions/Playing", {"ItemId": film.id}) == 204
    started = cluster.data(a, film.id).play_state
    assert (started.played, started.play_count) == (False, 2)
    await cluster.settle()
    # b still shows it played; it counts the new play, as a 12.0 server would.
    on_b = cluster.data(b, film.id).play_state
    assert on_b == PlayState(True, 2, started.last_played_s, 0)

    # The user stops a third of the way in: a keeps it unplayed at that position.
    third = film.run_time_ticks // 3
    stop = {"ItemId": film.id, "PositionTicks": third}
    assert await player.call("POST", "/Sessions/Playing/Stopped", stop) == 204
    stopped = cluster.data(a, film.id).play_state
    assert (stopped.played, stopped.position_ticks) == (False, third)
    await cluster.settle()
    # b: still played, and it can resume where the user stopped.
    assert cluster.data(b, film.id).play_state == PlayState(True, 2, stopped.last_played_s, third)
    # a was never written while the user was watching on it.
    assert cluster.data(a, film.id).play_state == stopped

    # Now the user explicitly marks it unplayed on a: every server shows it unplayed.
    assert await player.call("DELETE", f"/UserPlayedItems/{film.id}") == 200
    unplayed = cluster.data(a, film.id)
    assert unplayed.play_state == PlayState()
    await cluster.wait_all_hold(film.id, unplayed)


async def test_a_finished_rewatch_is_played_everywhere_with_the_count_jellyfin_keeps(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, server_version="10.11.11")
    a, _ = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    player = UserClient(http, a)
    await _watched_everywhere(cluster, player, film)

    # The user watches it again to the end on a.
    await player.play_and_stop(film.id, film.run_time_ticks * 97 // 100)
    finished = cluster.data(a, film.id)
    assert (finished.play_state.played, finished.play_state.play_count) == (True, 2)
    await cluster.wait_all_hold(film.id, finished)


async def test_on_12_a_rewatch_keeps_played_and_spreads_as_it_is(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, server_version="12.0.0")
    a, _ = cluster.emus
    film = _film(a)
    assert film.run_time_ticks is not None
    player = UserClient(http, a)
    await _watched_everywhere(cluster, player, film)

    # 12.0: the start keeps Played and counts the play; every server shows that.
    assert await player.call("POST", "/Sessions/Playing", {"ItemId": film.id}) == 204
    started = cluster.data(a, film.id)
    assert (started.play_state.played, started.play_state.play_count) == (True, 2)
    await cluster.wait_all_hold(film.id, started)
    # Stopped early: still played, with the resume position, everywhere.
    stop = {"ItemId": film.id, "PositionTicks": film.run_time_ticks // 3}
    assert await player.call("POST", "/Sessions/Playing/Stopped", stop) == 204
    stopped = cluster.data(a, film.id)
    assert stopped.play_state.played
    assert stopped.play_state.position_ticks == film.run_time_ticks // 3
    await cluster.wait_all_hold(film.id, stopped)


async def test_with_rewatch_protection_off_a_rewatch_unplays_everywhere(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, server_version="10.11.11", sync={"rewatch_protection": False})
    a, _ = cluster.emus
    film = _film(a)
    player = UserClient(http, a)
    await _watched_everywhere(cluster, player, film)

    assert await player.call("POST", "/Sessions/Playing", {"ItemId": film.id}) == 204
    started = cluster.data(a, film.id)
    assert not started.play_state.played
    await cluster.wait_all_hold(film.id, started)
