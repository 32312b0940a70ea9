"""A film marked played by playback progress alone, with no push, reaches the other servers.

Jellyfin saves progress reports with the resume rules but never pushes them (fact sheet,
Corrections 2): a player that reports progress past 90 % and then crashes, never reporting a
stop, leaves the item Played with no ``UserDataChanged`` at all. jfsync follows playback sessions
and reads the item once the session ends or goes quiet (tests/replication/test_playback_sessions.py);
the full reconcile repairs it too, whatever happened to the session, and this test shows that.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.replication.conftest import MakeCluster
from tests.replication.harness import WAIT_S, UserClient

pytestmark = pytest.mark.timeout(60)


async def test_a_film_played_past_90_percent_without_a_stop_is_played_everywhere_after_a_reconcile(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    film = next(i for i in a.leaf_items() if i.type == "Movie" and i.run_time_ticks)
    assert film.run_time_ticks is not None
    player = UserClient(http, a)
    assert await player.call("POST", "/Sessions/Playing", {"ItemId": film.id}) == 204
    # The start is pushed (and synced) long before the end of the film.
    await cluster.settle()
    started = cluster.data(b, film.id).play_state
    assert not started.played
    near_end = {"ItemId": film.id, "PositionTicks": film.run_time_ticks * 95 // 100}
    assert await player.call("POST", "/Sessions/Playing/Progress", near_end) == 204
    # The player crashes here: no stop. a shows the film played; nothing was pushed.
    watched = cluster.data(a, film.id).play_state
    assert watched.played
    await cluster.settle()
    assert cluster.data(b, film.id).play_state == started  # nothing reached b

    reconciler = cluster.service.reconciler
    assert reconciler is not None
    report = await reconciler.reconcile()
    assert report.changed >= 1
    await cluster.service.wait_for(lambda: cluster.data(b, film.id).play_state.played, WAIT_S)
    await cluster.settle()
    # Both servers show what the user's watching left on a (not merely the same thing).
    assert cluster.data(a, film.id).play_state == watched
    assert cluster.data(b, film.id).play_state == watched
