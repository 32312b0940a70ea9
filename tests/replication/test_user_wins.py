"""The user's last action wins at the worst moments (issue 11, cases 1 and 2).

Case 1: the user changes an item on a server right after jfsync's own write landed there,
inside the server's 500 ms debounce. The server then sends ONE event, read at flush time,
equal to the state jfsync's write replaced: content alone cannot tell it from a stale event.
jfsync must read the item back and let the user's action win on every server.

Case 2: a read (a catch-up scan page) requested before a live event but applied after it
must never override the event.

Server ``b``'s emulator runs on a ManualClock with Jellyfin's real 500 ms debounce, so "inside
the debounce" is exact: its push only flushes when the test advances that clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from jfsync.model import PlayState, UserData
from jfsync.sync import reconcile as reconcile_module
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import USER_KEY, WAIT_S, Cluster

pytestmark = pytest.mark.timeout(60)

#: Jellyfin's UserDataChanged debounce.
JELLYFIN_DEBOUNCE_S = 0.5


async def _b_on_a_manual_clock(make_cluster: MakeCluster) -> tuple[Cluster, ManualClock]:
    clock_b = ManualClock()
    cluster = await make_cluster(
        2,
        emulator_clocks={"b": clock_b},
        debounce_s={"a": 0.02, "b": JELLYFIN_DEBOUNCE_S},
    )
    return cluster, clock_b


async def _until(cluster: Cluster, predicate: Callable[[], bool]) -> None:
    await cluster.service.wait_for(predicate, WAIT_S)


async def _quiet(cluster: Cluster, clock_b: ManualClock, item: str) -> None:
    """Let b flush whatever is armed, then wait until nothing is queued or pending."""
    for _ in range(3):
        await clock_b.advance(JELLYFIN_DEBOUNCE_S)
        await asyncio.sleep(0)
    await cluster.settle()
    await cluster.wait_quiet([item])


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.2, 0.4])
async def test_taking_back_a_synced_favourite_inside_the_debounce_wins(
    make_cluster: MakeCluster, delay_s: float
) -> None:
    """The user favourites a film on a; as soon as b shows it, takes it back on b."""
    cluster, clock_b = await _b_on_a_manual_clock(make_cluster)
    a, b = cluster.emus
    item = cluster.free_items[0]

    cluster.change(a, item, is_favorite=True)
    await _until(cluster, lambda: cluster.data(b, item).favorite)
    # jfsync's write landed on b; its echo is armed. The user acts `delay_s` later.
    await clock_b.advance(delay_s)
    cluster.change(b, item, is_favorite=False)
    # One debounced event, read at flush time: favourite off, what jfsync's write replaced.
    await clock_b.advance(JELLYFIN_DEBOUNCE_S)

    await _until(cluster, lambda: not cluster.data(a, item).favorite)
    await _quiet(cluster, clock_b, item)
    assert cluster.data(a, item).favorite is False
    assert cluster.data(b, item).favorite is False
    assert cluster.service.counters.read_backs >= 1


async def test_a_rating_given_right_after_one_synced_from_another_server_wins(
    make_cluster: MakeCluster,
) -> None:
    """b rated the film 8 long ago; the user rates it 5 on a, then on b, seeing the 5 arrive,
    puts 8 back: the later action (on b) wins everywhere, not the server order."""
    cluster, clock_b = await _b_on_a_manual_clock(make_cluster)
    a, b = cluster.emus
    item = cluster.free_items[1]
    cluster.change(b, item, rating=8.0)
    await clock_b.advance(JELLYFIN_DEBOUNCE_S)
    await _until(cluster, lambda: cluster.data(a, item).rating == 8.0)
    await _quiet(cluster, clock_b, item)

    cluster.change(a, item, rating=5.0)
    await _until(cluster, lambda: cluster.data(b, item).rating == 5.0)
    await clock_b.advance(0.1)
    cluster.change(b, item, rating=8.0)
    await clock_b.advance(JELLYFIN_DEBOUNCE_S)

    await _until(cluster, lambda: cluster.data(a, item).rating == 8.0)
    await _quiet(cluster, clock_b, item)
    assert cluster.data(a, item).rating == 8.0
    assert cluster.data(b, item).rating == 8.0


async def test_unplaying_right_after_a_synced_watch_wins(make_cluster: MakeCluster) -> None:
    """Watched on a; on b the user marks it unwatched again the moment it shows as watched."""
    cluster, clock_b = await _b_on_a_manual_clock(make_cluster)
    a, b = cluster.emus
    item = cluster.free_items[2]
    cluster.change(a, item, played=True, play_count=1)
    await _until(cluster, lambda: cluster.data(b, item).play_state.played)
    cluster.change(b, item, played=False, play_count=0, clear_last_played=True)
    await clock_b.advance(JELLYFIN_DEBOUNCE_S)

    await _until(cluster, lambda: not cluster.data(a, item).play_state.played)
    await _quiet(cluster, clock_b, item)
    for emu in (a, b):
        assert cluster.data(emu, item).play_state == PlayState()


async def test_the_write_itself_still_echoes_quietly(make_cluster: MakeCluster) -> None:
    """No user action on b: the write's echo is recognised, nothing is read back or resent."""
    cluster, clock_b = await _b_on_a_manual_clock(make_cluster)
    a, b = cluster.emus
    item = cluster.free_items[3]
    cluster.change(a, item, is_favorite=True)
    await _until(cluster, lambda: cluster.data(b, item).favorite)
    await _quiet(cluster, clock_b, item)
    assert cluster.data(a, item).favorite
    assert cluster.data(b, item).favorite
    assert len(cluster.writes(b, [item])) == 1
    assert cluster.writes(a, [item]) == []
    assert cluster.service.counters.read_backs == 0


# ---------------------------------------------------------------------- case 2


async def test_a_scan_page_older_than_a_live_event_does_not_revert_it(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up of a is under way; its page (favourite on) has been read but not applied when
    the user takes the favourite back on a and the event is applied. The page, applied after,
    must not bring the favourite back on either server."""
    cluster = await make_cluster(2)
    a, b = cluster.emus
    item = cluster.free_items[4]
    cluster.change(a, item, is_favorite=True)
    await cluster.wait_all_hold(item, UserData(favorite=True))

    page_read = asyncio.Event()
    release = asyncio.Event()
    real_scan = reconcile_module.scan_non_default

    async def held_scan(*args: Any, **kwargs: Any) -> Any:
        found = await real_scan(*args, **kwargs)
        page_read.set()
        await release.wait()
        return found

    monkeypatch.setattr(reconcile_module, "scan_non_default", held_scan)
    reconciler = cluster.service.reconciler
    assert reconciler is not None
    catch_up: Awaitable[Any] = reconciler.catch_up("a", cluster.uid(a), USER_KEY)
    task = asyncio.ensure_future(catch_up)
    try:
        await asyncio.wait_for(page_read.wait(), WAIT_S)
        # The page shows the favourite; now the user takes it back on a, live.
        cluster.change(a, item, is_favorite=False)
        await _until(cluster, lambda: not cluster.data(b, item).favorite)
        release.set()
        result = await asyncio.wait_for(task, WAIT_S)
    finally:
        release.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert result.changed == 0
    await cluster.settle()
    await cluster.wait_quiet([item])
    assert cluster.data(a, item).favorite is False
    assert cluster.data(b, item).favorite is False
