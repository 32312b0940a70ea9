"""Every register reaches every other server, whichever server the user changed it on.

Three emulators and jfsync over loopback. Each test changes one register on one server after
another (as a user of that server: its REST routes with a user token, playback reports, or
the emulator's own save path, which echoes the same way) and waits until all three hold it.
"""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
import pytest

from jfsync.model import PlayState, UserData
from tests.replication.conftest import MakeCluster
from tests.replication.harness import UserClient

pytestmark = pytest.mark.timeout(30)

#: Ticks per minute (1 tick = 100 ns).
MINUTE_TICKS = 600_000_000


async def test_favourite_on_and_off_from_every_server(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(3)
    a, b, c = cluster.emus
    item = cluster.free_items[0]
    await UserClient(http, a).favorite(item, True)
    await cluster.wait_all_hold(item, UserData(favorite=True))
    await UserClient(http, b).favorite(item, False)
    await cluster.wait_all_hold(item, UserData(favorite=False))
    await UserClient(http, c).favorite(item, True)
    await cluster.wait_all_hold(item, UserData(favorite=True))


async def test_rating_set_changed_and_cleared(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(3)
    a, b, c = cluster.emus
    item = cluster.free_items[1]
    cluster.change(a, item, rating=7.5)
    await cluster.wait_all_hold(item, UserData(rating=7.5))
    cluster.change(b, item, rating=2.0)
    await cluster.wait_all_hold(item, UserData(rating=2.0))
    cluster.change(c, item, clear_rating=True)
    await cluster.wait_all_hold(item, UserData(rating=None))
    cluster.change(b, item, rating=10.0)
    await cluster.wait_all_hold(item, UserData(rating=10.0))
    cluster.change(a, item, clear_rating=True)
    await cluster.wait_all_hold(item, UserData())
    # A cleared rating is really gone on the peers (DELETE), not set to some value.
    assert all(e.stored_user_data(cluster.uid(e), item).rating is None for e in cluster.emus)


async def test_played_unplayed_and_play_count(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(3)
    a, b, c = cluster.emus
    item = cluster.free_items[2]
    watched = datetime(2025, 3, 1, 20, 15, 42, tzinfo=UTC)
    cluster.change(a, item, played=True, play_count=1, last_played=watched)
    played = UserData(play_state=PlayState(True, 1, int(watched.timestamp()), 0))
    await cluster.wait_all_hold(item, played)

    cluster.change(c, item, play_count=4)
    await cluster.wait_all_hold(
        item, UserData(play_state=PlayState(True, 4, played.play_state.last_played_s, 0))
    )

    # Unplayed on B, as Jellyfin's MarkUnplayed does it: count 0, position 0, no date.
    cluster.change(b, item, played=False, play_count=0, position_ticks=0, clear_last_played=True)
    await cluster.wait_all_hold(item, UserData())
    for emu in cluster.emus:
        assert emu.stored_user_data(cluster.uid(emu), item).last_played is None, emu.server_name


async def test_resume_position_after_playback_stop(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(3)
    a, b, c = cluster.emus
    movie = next(i for i in a.leaf_items() if (i.run_time_ticks or 0) >= 60 * MINUTE_TICKS)
    runtime = movie.run_time_ticks or 0
    position = runtime // 3
    await UserClient(http, b).play_and_stop(movie.id, position)
    stopped = cluster.data(b, movie.id)
    assert stopped.play_state.position_ticks == position
    assert not stopped.play_state.played
    await cluster.wait_all_hold(movie.id, stopped)

    # Watching to the end on C marks it played and clears the position everywhere.
    await UserClient(http, c).play_and_stop(movie.id, runtime)
    finished = cluster.data(c, movie.id)
    assert finished.play_state.played
    assert finished.play_state.position_ticks == 0
    assert finished.play_state.play_count == 2
    await cluster.wait_all_hold(movie.id, finished)
    assert cluster.data(a, movie.id) == finished
