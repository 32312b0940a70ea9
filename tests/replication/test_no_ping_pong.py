"""No ping-pong: every server receives exactly the writes the users' changes require.

jfsync's own writes echo back from every server (fact sheet §2, §3). After a burst and then
quiet (the sentinel barrier of :meth:`Cluster.settle`), each server must have received one
write per item changed elsewhere and none for what it changed itself: an echo taken for a
change would show up as an extra write. The stale-echo races hold a server's websocket frames
in a proxy so that an event flushed before jfsync's next write reaches jfsync after it.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from jfsync.emulator import Emulator
from jfsync.model import UserData
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import DEBOUNCE_S, Cluster

pytestmark = pytest.mark.timeout(30)

BASE_DATE = datetime(2025, 1, 1, tzinfo=UTC)


def first_change(cluster: Cluster, emu: Emulator, item: str, kind: int) -> UserData:
    """Make one change to an untouched item that a peer needs one POST to copy."""
    if kind == 0:
        return cluster.change(emu, item, is_favorite=True)
    if kind == 1:
        return cluster.change(emu, item, rating=float(1 + hash(item) % 9))
    if kind == 2:
        when = BASE_DATE + timedelta(hours=hash(item) % 1000)
        return cluster.change(emu, item, played=True, play_count=1, last_played=when)
    return cluster.change(emu, item, position_ticks=6_000_000_000 + hash(item) % 1000)


def undo_change(cluster: Cluster, emu: Emulator, item: str) -> UserData:
    """Reset an item to the untouched state (a peer needs one request: POST or DELETE)."""
    return cluster.change(
        emu,
        item,
        is_favorite=False,
        clear_rating=True,
        played=False,
        play_count=0,
        clear_last_played=True,
        position_ticks=0,
    )


def write_counts(cluster: Cluster, emu: Emulator, items: list[str]) -> Counter[str]:
    """Successful writes per item that ``emu`` received."""
    return Counter(w.item_id for w in cluster.writes(emu, items) if w.item_id)


async def test_burst_then_quiet_gets_exactly_the_required_writes(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3)
    rng = random.Random(4)
    items = cluster.free_items[:30]
    origin = {item: rng.choice(cluster.emus[:2]) for item in items}
    expected: dict[str, UserData] = {}
    for n, item in enumerate(items):
        expected[item] = first_change(cluster, origin[item], item, n % 4)
    await cluster.settle()
    for item in items:
        assert cluster.all_hold(item, expected[item]), item
    for emu in cluster.emus:
        # One write per item changed on another server, none for its own.
        want = Counter({i: 1 for i in items if origin[i] is not emu})
        assert write_counts(cluster, emu, items) == want, emu.server_name

    # Second burst: the third server undoes every item; each peer needs one request per item.
    c = cluster.emus[2]
    for item in items:
        undo_change(cluster, c, item)
    await cluster.settle()
    for item in items:
        assert cluster.all_hold(item, UserData()), item
    assert write_counts(cluster, c, items) == Counter({i: 1 for i in items})
    for emu in cluster.emus[:2]:
        want = Counter({i: 1 + (origin[i] is not emu) for i in items})
        assert write_counts(cluster, emu, items) == want, emu.server_name
    assert not any(w.status >= 300 for e in cluster.emus for w in e.writes)
    assert cluster.service.counters.echoes > 0


async def test_stale_echo_of_the_first_write_arriving_after_the_second(
    make_cluster: MakeCluster,
) -> None:
    clock_b = ManualClock()
    cluster = await make_cluster(3, emulator_clocks={"b": clock_b}, gated=("b",))
    a, b, c = cluster.emus
    gate = cluster.gates["b"]
    item = cluster.free_items[0]

    gate.hold()
    cluster.change(a, item, is_favorite=True)
    first = UserData(favorite=True)
    await cluster.service.wait_for(lambda: cluster.data(b, item) == first, 20)
    await wait_pending(cluster, "b", item, 1)
    # b flushes the echo of jfsync's first write (favourite only); it waits in the proxy.
    await flushed(clock_b, b)

    cluster.change(a, item, rating=7.0)
    second = UserData(favorite=True, rating=7.0)
    await cluster.service.wait_for(lambda: cluster.data(b, item) == second, 20)
    await wait_pending(cluster, "b", item, 2)
    await flushed(clock_b, b)

    # Now jfsync reads the stale echo (favourite, no rating), then the fresh one.
    gate.release()
    await cluster.settle()
    assert cluster.all_hold(item, second)
    assert write_counts(cluster, a, [item]) == Counter()
    assert write_counts(cluster, b, [item]) == Counter({item: 2})
    assert write_counts(cluster, c, [item]) == Counter({item: 2})


async def test_event_flushed_before_a_write_and_read_after_it_undoes_nothing(
    make_cluster: MakeCluster,
) -> None:
    clock_b = ManualClock()
    cluster = await make_cluster(3, emulator_clocks={"b": clock_b}, gated=("b",))
    a, b, _ = cluster.emus
    gate = cluster.gates["b"]
    item = cluster.free_items[1]

    # b's user rates the item; b flushes that event, and it is held on its way to jfsync.
    gate.hold()
    cluster.change(b, item, rating=4.0)
    await flushed(clock_b, b)
    # a's user favourites it: jfsync reads b first (finds the rating), then writes b.
    cluster.change(a, item, is_favorite=True)
    both = UserData(favorite=True, rating=4.0)
    await cluster.service.wait_for(lambda: cluster.all_hold(item, both), 20)
    await flushed(clock_b, b)

    # b's old event (rating, no favourite) now arrives after jfsync's write.
    gate.release()
    await cluster.settle()
    assert cluster.all_hold(item, both)
    assert write_counts(cluster, b, [item]) == Counter({item: 1})
    assert write_counts(cluster, a, [item]) == Counter({item: 1})


async def flushed(clock: ManualClock, emu: Emulator) -> None:
    """Let ``emu`` flush its armed push (its debounce runs on ``clock``) and send it."""
    await clock.advance(DEBOUNCE_S)
    for _ in range(1000):  # loop turns, not time: the send may need a few more
        if not emu.pushes_pending:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{emu.server_name} did not send its push")


async def _pending(cluster: Cluster, server: str, item: str, count: int) -> bool:
    """Tell whether at least ``count`` writes to ``server`` wait for their echo."""
    return len(await cluster.pending(server, item)) >= count


async def wait_pending(cluster: Cluster, server: str, item: str, count: int) -> None:
    """Wait until ``count`` writes to ``server`` are recorded; say what is pending if not."""
    try:
        await cluster.service.wait_for(lambda: _pending(cluster, server, item, count), 20)
    except TimeoutError:
        found = await cluster.pending(server, item)
        raise AssertionError(f"pending on {server}: {found}") from None
