"""A bulk action is applied in slices: its first writes leave early, nothing waits for all of it.

Marking a season or a library played sends one ``UserDataChanged`` of thousands of entries.
jfsync applies it a slice at a time (:mod:`jfsync.sync.intake`), so the first writes to the
other servers leave after the first slice, and a change the user makes elsewhere meanwhile is
neither held up by the rest of the message nor overwritten by the older entries still to be
applied, whether it arrives as an event or is found by a catch-up: the user's last action wins.

The slices are made tiny here (a few entries, mapped fifty at a time), so that a bulk action of
a few hundred items takes many transactions, as ten thousand do with the real sizes. What is asserted is order
(what was still unapplied when something happened), never time.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jfsync import emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord
from jfsync.model import PlayState, UserData
from jfsync.sync import intake as intake_module
from tests.replication.conftest import MakeCluster
from tests.replication.harness import Cluster

pytestmark = pytest.mark.timeout(60)

BULK = 300
WHEN = datetime(2025, 6, 1, 20, 0, tzinfo=UTC)
LATER = datetime(2025, 6, 1, 21, 0, tzinfo=UTC)
PLAYED = UserData(play_state=PlayState(True, 1, int(WHEN.timestamp()), 0))


@pytest.fixture(autouse=True)
def tiny_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake_module, "FIRST_SLICE", 3)
    monkeypatch.setattr(intake_module, "SLICE", 2)
    monkeypatch.setattr(intake_module, "MAP_STEP", 50)


def unapplied_at_writes(cluster: Cluster, to: Emulator, items: set[str]) -> list[int]:
    """Install an observer noting how many entries were still unapplied at each write of
    ``items`` reaching ``to``; returns the list it fills."""
    counts: list[int] = []

    def note(emu: Emulator, record: RequestRecord) -> None:
        path = record.path.rstrip("/").split("/")
        if emu is to and record.method == "POST" and len(path) > 2 and path[-2] in items:
            counts.append(cluster.service.intake.unapplied)

    emulator_module.request_observers.append(note)
    return counts


async def bulk_played(cluster: Cluster, server: str, items: list[str]) -> None:
    """Mark ``items`` played on ``server`` at once (one message) and send it now."""
    emu = cluster.emu(server)
    for item in items:
        cluster.change(emu, item, played=True, play_count=1, last_played=WHEN)
    await emu.flush_now()


async def test_first_writes_of_a_bulk_action_leave_before_it_is_all_applied(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, leaves=BULK + 10)
    b = cluster.emu("b")
    items = cluster.free_items[:BULK]
    counts = unapplied_at_writes(cluster, b, set(items))
    try:
        await bulk_played(cluster, "a", items)
        await cluster.wait_items([b], items, PLAYED)
    finally:
        emulator_module.request_observers.pop()
    # The first write reached b while most of the message was still to be applied.
    assert counts[0] > BULK // 2
    await cluster.settle()
    assert cluster.service.intake.unapplied == 0
    assert all(cluster.all_hold(item, PLAYED) for item in items)


async def test_a_change_elsewhere_is_not_held_up_by_a_bulk_action(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, leaves=BULK + 10, gated=("a",))
    a, b = cluster.emus
    items = cluster.free_items[:BULK]
    favourite = cluster.free_items[BULK]
    counts = unapplied_at_writes(cluster, a, {favourite})
    try:
        gate = cluster.gates["a"]
        gate.hold()
        await bulk_played(cluster, "a", items)
        gate.release()
        await cluster.wait(lambda: cluster.service.intake.unapplied > 0)
        # The user favourites another film on b while a's bulk action is being applied.
        cluster.change(b, favourite, is_favorite=True)
        await cluster.wait_all_hold(favourite, UserData(favorite=True))
    finally:
        emulator_module.request_observers.pop()
    assert counts, "the favourite never reached a"
    assert counts[0] > 0, "the favourite reached a after the whole bulk action"
    await cluster.wait_items([b], items, PLAYED)


async def test_the_users_last_action_wins_in_the_middle_of_a_sliced_apply(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, leaves=BULK + 10, gated=("a", "b"))
    b = cluster.emu("b")
    items = cluster.free_items[:BULK]
    last = items[-1]
    # The last item is a favourite everywhere already: both servers are known for it, so
    # what decides between two changes of it is which came last, not what they hold.
    cluster.change("a", last, is_favorite=True)
    await cluster.wait_all_hold(last, UserData(favorite=True))
    gate_a, gate_b = cluster.gates["a"], cluster.gates["b"]
    gate_a.hold()
    gate_b.hold()
    # The user marks everything played on a, then, on b, goes back into the last item: it is
    # not played there any more and has a resume position.
    await bulk_played(cluster, "a", items)
    resumed = cluster.change(b, last, played=False, position_ticks=5_000_000)
    await b.flush_now()
    gate_a.release()
    await cluster.wait(lambda: cluster.service.intake.unapplied > 0)
    # a's bulk action is being applied, its last item still to come, when b's change arrives.
    assert cluster.service.intake.unapplied > BULK // 2
    gate_b.release()
    await cluster.wait_all_hold(last, resumed)
    await cluster.wait_items([b], items[:-1], PLAYED)
    await cluster.settle()
    assert cluster.all_hold(last, resumed)
    assert all(cluster.all_hold(item, PLAYED) for item in items[:-1])


async def test_a_catch_up_during_a_sliced_apply_lets_the_later_change_win(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, leaves=BULK + 10, gated=("a",))
    b = cluster.emu("b")
    items = cluster.free_items[:BULK]
    last = items[-1]
    cluster.change("a", last, is_favorite=True)
    await cluster.wait_all_hold(last, UserData(favorite=True))
    gate_a = cluster.gates["a"]
    gate_a.hold()
    await bulk_played(cluster, "a", items)
    # Then, on b, the user plays a bit of the last item: progress is saved without a push
    # (Jellyfin's PlaybackProgress), so only a catch-up of b can find it.
    resumed = cluster.change(b, last, reason="PlaybackProgress", position_ticks=5_000_000)
    gate_a.release()
    await cluster.wait(lambda: cluster.service.intake.unapplied > 0)
    assert cluster.service.intake.unapplied > BULK // 2
    # b's socket drops while a's bulk action is being applied: jfsync catches b up.
    await b.drop_sockets()
    await cluster.wait_all_hold(last, resumed)
    await cluster.wait_items([b], items[:-1], PLAYED)
    await cluster.settle()
    assert cluster.all_hold(last, resumed)
