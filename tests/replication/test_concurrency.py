"""Concurrent edits: one register edited on two servers ends everywhere as the later stamp says;
different registers edited on different servers all survive.

Stamps come from jfsync's clock when it *observes* a change, so "later" means observed later.
To make the order certain, server ``a``'s emulator runs on a ManualClock: its echo of the
user's edit is only flushed when the test advances that clock, so jfsync sees ``b``'s edit
first and ``a``'s edit later (through the read it makes before writing to ``a``).
"""

from __future__ import annotations

import pytest

from jfsync.model import PlayState, UserData
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import DEBOUNCE_S, USER_KEY

pytestmark = pytest.mark.timeout(30)


async def test_one_register_on_two_servers_converges_to_the_later_stamp(
    make_cluster: MakeCluster,
) -> None:
    clock_a = ManualClock()
    cluster = await make_cluster(3, emulator_clocks={"a": clock_a})
    a, b, c = cluster.emus
    item = cluster.free_items[0]
    # History first, so both edits are plain changes (not a first meeting of the servers).
    cluster.change(c, item, rating=5.0)
    await cluster.service.wait_for(lambda: cluster.all_hold(item, UserData(rating=5.0)), 20)
    await clock_a.advance(DEBOUNCE_S)  # deliver a's echo of jfsync's write
    await cluster.wait_quiet([item])

    # Both users edit the rating before jfsync has seen either edit.
    cluster.change(a, item, rating=3.0)
    cluster.change(b, item, rating=8.0)
    # b's edit arrives first; jfsync then reads a before writing to it, sees a's edit later.
    await cluster.service.wait_for(lambda: cluster.all_hold(item, UserData(rating=3.0)), 20)
    canonical = await cluster.service.ledger.canonical(USER_KEY, item)
    assert canonical is not None
    assert canonical.rating.origin == "a"
    assert canonical.data.rating == 3.0

    # a's own event, delivered now, is old news and changes nothing.
    await clock_a.advance(DEBOUNCE_S)
    await cluster.settle()
    assert cluster.all_hold(item, UserData(rating=3.0))
    # b's edit was overwritten exactly once on b, never re-sent to a.
    assert len(cluster.writes(b, [item])) == 2  # the history write, then the later stamp
    assert len(cluster.writes(a, [item])) == 1  # only the history write


async def test_same_register_edited_everywhere_at_once_converges(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(3)
    item = cluster.free_items[1]
    cluster.change(cluster.emus[0], item, is_favorite=True)
    await cluster.wait_all_hold(item, UserData(favorite=True))
    for n, emu in enumerate(cluster.emus):
        cluster.change(emu, item, rating=float(n + 2))
    await cluster.settle()
    canonical = await cluster.service.ledger.canonical(USER_KEY, item)
    assert canonical is not None
    winner = canonical.rating.origin
    # Whichever edit jfsync observed last is the one every server holds.
    expected = UserData(favorite=True, rating=float("abc".index(winner) + 2))
    assert cluster.all_hold(item, expected), [cluster.data(e, item) for e in cluster.emus]


async def test_different_registers_on_different_servers_all_survive(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3)
    a, b, c = cluster.emus
    item = cluster.free_items[2]
    cluster.change(a, item, is_favorite=True)
    cluster.change(b, item, rating=6.0)
    cluster.change(c, item, position_ticks=12_000_000_000)
    expected = UserData(
        favorite=True, rating=6.0, play_state=PlayState(position_ticks=12_000_000_000)
    )
    await cluster.wait_all_hold(item, expected)
    await cluster.settle()
    assert cluster.all_hold(item, expected)
