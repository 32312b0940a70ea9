"""A catch-up that runs while the user keeps changing things finishes, and the last action wins.

While live events flow, a catch-up goes in small steps (listing pages, whole-user passes, id
look-ups, ledger transactions) and gives way to the live work under way between two of them
(:mod:`jfsync.sync.priority`): the user's changes are not held up behind it. Giving way must
never become waiting forever: a stream of changes, or a delivery that never ends, slows a
catch-up down but never stops it. The steps are made tiny here (two items), so that a catch-up
of twenty items takes about a hundred of them; what is asserted is what every server ends up
holding and the order things happened in, never time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from jfsync import emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord
from jfsync.model import UserData
from jfsync.sync import catchup as catchup_module
from jfsync.sync import priority as priority_module
from jfsync.sync import reconcile as reconcile_module
from jfsync.sync.ledger import Applied, Observation
from tests.replication.conftest import MakeCluster
from tests.replication.harness import USER_KEY, Cluster

pytestmark = pytest.mark.timeout(90)

#: Items whose progress only a catch-up can find (saved without a push).
FOUND = 20
#: Items the user keeps changing on a meanwhile.
STREAMED = 4
TINY = 2


@pytest.fixture(autouse=True)
def tiny_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of a catch-up covers two items while events flow."""
    monkeypatch.setattr(reconcile_module, "LIVE_SCAN_PAGE", TINY)
    monkeypatch.setattr(reconcile_module, "LIVE_SCAN_BATCH", TINY)
    monkeypatch.setattr(reconcile_module, "LIVE_MAP_STEP", TINY)
    monkeypatch.setattr(reconcile_module, "LIVE_READ_PAGE", TINY)
    monkeypatch.setattr(catchup_module, "PASS_STEP", TINY)


def progress_found_only_by_a_catch_up(cluster: Cluster, on: Emulator) -> dict[str, UserData]:
    """The user plays a bit of FOUND films on ``on``; progress is saved without a push
    (Jellyfin's PlaybackProgress): only a catch-up of ``on`` finds it."""
    return {
        item: cluster.change(on, item, reason="PlaybackProgress", position_ticks=5_000_000)
        for item in cluster.free_items[:FOUND]
    }


@contextmanager
def live_sized_listings(on: Emulator) -> Iterator[list[int]]:
    """Count, meanwhile, the catch-up listings of ``on`` asked for in pages of :data:`TINY`
    (the size used while live events flow) in the list yielded."""
    seen: list[int] = []

    def note(emu: Emulator, record: RequestRecord) -> None:
        if (
            emu is on
            and record.method == "GET"
            and record.path.rstrip("/").endswith("/Items")
            and "filters" in {k.lower() for k in record.query}
            and record.query.get("limit") == [str(TINY)]
        ):
            seen.append(1)

    emulator_module.request_observers.append(note)
    try:
        yield seen
    finally:
        emulator_module.request_observers.remove(note)


async def test_a_catch_up_under_a_stream_of_changes_finishes_and_the_last_action_wins(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user played a bit of twenty films on b while jfsync was away from it; b is caught
    up while, on a, the user keeps toggling the favourite of four other films, one change
    after another, each reaching b before the next is made. The changes keep reaching b while
    the catch-up runs (it gives way to them), the catch-up finishes while they still flow, and
    every server ends with the progress found and each film's last favourite state."""
    cluster = await make_cluster(2, leaves=40)
    a, b = cluster.emus
    found = progress_found_only_by_a_catch_up(cluster, b)
    streamed = cluster.free_items[FOUND : FOUND + STREAMED]
    last: dict[str, UserData] = {}
    made = 0

    async def change_next() -> None:
        nonlocal made
        item = streamed[made % STREAMED]
        last[item] = cluster.change(a, item, is_favorite=(made // STREAMED) % 2 == 0)
        made += 1
        await cluster.wait(lambda: cluster.holds(b, item, last[item]))

    ledger = cluster.service.ledger
    apply = ledger.apply_observations
    order: list[str] = []
    held_at = -1

    async def noting(observations: Sequence[Observation], **options: Any) -> list[Applied]:
        nonlocal held_at
        result = await apply(observations, **options)
        if any(o.source == "scan" and o.server == "b" for o in observations):
            order.append("scan")
            if held_at < 0:
                # The first slice of what the catch-up found is applied: it goes on only
                # once the stream has brought two more changes to b.
                held_at = made
                await cluster.wait(lambda: made >= held_at + 2)
        elif any(o.source == "event" and o.server == "a" for o in observations):
            order.append("event")
        return result

    monkeypatch.setattr(ledger, "apply_observations", noting)
    with live_sized_listings(b) as listings:
        await change_next()  # events flow before the catch-up starts
        catch_up = asyncio.ensure_future(
            cluster.service.reconciler.catch_up("b", cluster.uid(b), USER_KEY)
        )
        try:
            while not catch_up.done():
                await change_next()
            result = await catch_up
        finally:
            if not catch_up.done():
                catch_up.cancel()
            await asyncio.gather(catch_up, return_exceptions=True)
    assert result.changed == FOUND
    # The catch-up listed b in the small pages used while events flow, and the user's
    # changes were applied between its slices, not after all of them.
    assert len(listings) >= FOUND // TINY
    first, final = order.index("scan"), len(order) - 1 - order[::-1].index("scan")
    assert "event" in order[first:final]
    assert made >= held_at + 2
    await cluster.settle()
    for item, state in found.items():
        await cluster.wait_all_hold(item, state)
    for item, state in last.items():
        assert cluster.all_hold(item, state)
    assert all(cluster.holds(a, item, state) for item, state in found.items())


async def test_a_catch_up_finishes_while_live_work_never_ends(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user favourites a film on a; its delivery to b hangs (b's answers are held), so live
    work stays under way. Meanwhile c, which the user played a bit of twenty films on, is
    caught up: each of its steps gives way to the hanging delivery for a bounded time, then
    goes on, so the catch-up finishes while the delivery still hangs. Once b answers again,
    every server holds the favourite and the progress found on c."""
    # The bound of a give-way, made short: the catch-up has about a hundred steps.
    monkeypatch.setattr(priority_module, "MAX_YIELD_S", 0.005)
    cluster = await make_cluster(3, leaves=40, gated=("b",))
    a, b, c = cluster.emus
    found = progress_found_only_by_a_catch_up(cluster, c)
    item = cluster.free_items[FOUND]
    live = cluster.service.live
    gate = cluster.gates["b"]
    gate.hold_http()
    try:
        favourite = cluster.change(a, item, is_favorite=True)
        await cluster.wait_items([c], [item], favourite)
        await cluster.wait(lambda: live.busy)
        with live_sized_listings(c) as listings:
            result = await cluster.service.reconciler.catch_up("c", cluster.uid(c), USER_KEY)
        assert result.changed == FOUND
        assert len(listings) >= FOUND // TINY
        # The delivery to b was under way all along: it has not reached b yet.
        assert live.busy
        assert not cluster.holds(b, item, favourite)
    finally:
        gate.release_http()
    await cluster.wait_all_hold(item, favourite)
    for found_item, state in found.items():
        await cluster.wait_all_hold(found_item, state)
    await cluster.settle()
    assert cluster.all_hold(item, favourite)
    assert all(cluster.all_hold(i, state) for i, state in found.items())
