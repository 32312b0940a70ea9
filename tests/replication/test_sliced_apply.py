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

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from jfsync import emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord
from jfsync.model import PlayState, UserData
from jfsync.sync import intake as intake_module
from jfsync.sync import priority as priority_module
from jfsync.sync import reconcile as reconcile_module
from jfsync.sync.ledger import Applied, Observation
from tests.replication.conftest import MakeCluster
from tests.replication.harness import USER_KEY, Cluster
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

BULK = 300
FIRST = 3
WHEN = datetime(2025, 6, 1, 20, 0, tzinfo=UTC)
LATER = datetime(2025, 6, 1, 21, 0, tzinfo=UTC)
PLAYED = UserData(play_state=PlayState(True, 1, int(WHEN.timestamp()), 0))


@pytest.fixture(autouse=True)
def tiny_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake_module, "FIRST_SLICE", FIRST)
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


class Pacing:
    """Holds the slices of a's bulk action after the first until the user's later change is in.

    Each slice starts by waiting for earlier writes of its items (``Intake._settled``), before
    its entries leave the intake: held there, they stay pull-able by whatever comes later.
    a's slices after its first wait while :attr:`paced` holds. What ends the pacing is the
    later change pulling a's older entry of ``last`` forward: a slice carrying that entry with
    another server's, or an ``apply_ahead`` (a catch-up's) while it is still unapplied. Nothing
    else does (a read or push of ``last`` before a's entry of it arrived pulls nothing), so the
    later change always lands in the middle of the apply, by order, never by timing.
    """

    def __init__(self, cluster: Cluster, monkeypatch: pytest.MonkeyPatch, last: str) -> None:
        self.paced = True
        #: Set once one of a's slices is held.
        self.holding = False
        #: What ended the pacing (for a failing test's message).
        self.ended_by = ""
        self._resume = asyncio.Event()
        self._bulk_slices = 0
        intake = cluster.service.intake
        settled, ahead = intake._settled, intake.apply_ahead

        async def paced_settled(user: str, entries: list[Any]) -> None:
            from_a = [e for e in entries if e.server == "a"]
            if any(e.item == last for e in from_a) and len(from_a) < len(entries):
                self.resume("a slice pulling a's entry of the last item forward")
            elif from_a and len(from_a) == len(entries):
                self._bulk_slices += 1
                if self._bulk_slices > 1 and self.paced:
                    self.holding = True
                    await self._resume.wait()
            await settled(user, entries)

        async def unpaced_ahead(keys: Iterable[tuple[str, str]]) -> None:
            keys = list(keys)
            if any(key[1] == last and key in intake._held for key in keys):
                self.resume("an apply_ahead of the last item while a's entry of it was unapplied")
            await ahead(keys)

        monkeypatch.setattr(intake, "_settled", paced_settled)
        monkeypatch.setattr(intake, "apply_ahead", unpaced_ahead)

    async def wait_holding(self, cluster: Cluster) -> None:
        """Wait until a's bulk action is held with all but its first slice unapplied."""
        intake = cluster.service.intake
        await wait_until(
            lambda: not self.paced or (self.holding and intake.unapplied >= BULK - FIRST)
        )
        assert self.paced, f"the pacing ended early, by {self.ended_by}"

    def resume(self, why: str) -> None:
        if self.paced:
            self.ended_by = why
        self.paced = False
        self._resume.set()


async def bulk_played(cluster: Cluster, server: str, items: list[str]) -> None:
    """Mark ``items`` played on ``server`` at once (one message) and send it now."""
    emu = cluster.emu(server)
    for item in items:
        cluster.change(emu, item, played=True, play_count=1, last_played=WHEN)
    await emu.flush_now()


async def test_first_writes_of_a_bulk_action_leave_before_it_is_all_applied(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await make_cluster(2, leaves=BULK + 10)
    b = cluster.emu("b")
    items = cluster.free_items[:BULK]
    # Order, not speed: every slice after the first waits (up to a bound) for a write to reach
    # b. Pushed after the first slice, one does; pushed only once everything was applied, none
    # can, each bound runs out and the first write finds the whole message applied.
    ledger = cluster.service.ledger
    apply = ledger.apply_observations
    applied = 0
    applied_at_writes: list[int] = []

    def note(emu: Emulator, record: RequestRecord) -> None:
        path = record.path.rstrip("/").split("/")
        if emu is b and record.method == "POST" and len(path) > 2 and path[-2] in items:
            applied_at_writes.append(applied)

    async def apply_when_b_was_written(
        observations: Sequence[Observation], **options: Any
    ) -> list[Applied]:
        nonlocal applied
        bulk = [o for o in observations if o.source == "event" and o.item in keys]
        if bulk and applied:
            with contextlib.suppress(TimeoutError):
                await wait_until(lambda: bool(applied_at_writes), timeout_s=0.5)
        result = await apply(observations, **options)
        applied += len(bulk)
        return result

    keys = {await cluster.key("a", item) for item in items}
    monkeypatch.setattr(ledger, "apply_observations", apply_when_b_was_written)
    emulator_module.request_observers.append(note)
    try:
        await bulk_played(cluster, "a", items)
        await cluster.wait_items([b], items, PLAYED)
    finally:
        emulator_module.request_observers.pop()
    # The first write reached b while most of the message was still to be applied.
    assert 0 < applied_at_writes[0] < BULK // 2
    await cluster.settle()
    assert cluster.service.intake.unapplied == 0
    assert all(cluster.all_hold(item, PLAYED) for item in items)


async def test_a_change_elsewhere_is_not_held_up_by_a_bulk_action(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await make_cluster(2, leaves=BULK + 10, gated=("a",))
    a, b = cluster.emus
    items = cluster.free_items[:BULK]
    favourite = cluster.free_items[BULK]
    counts = unapplied_at_writes(cluster, a, {favourite})
    # a's slices after the first wait until the favourite has reached a: the bulk action is
    # under way by order, not by timing (on a loaded machine it could end first), and a
    # favourite held up behind it never arrives (the wait below times out).
    reached = asyncio.Event()
    emulator_module.request_observers.append(
        lambda emu, record: reached.set() if emu is a and counts else None
    )
    intake = cluster.service.intake
    settled = intake._settled
    slices = 0

    async def held_settled(user: str, entries: list[Any]) -> None:
        nonlocal slices
        if entries and all(e.server == "a" for e in entries):
            slices += 1
            if slices > 1:
                await reached.wait()
        await settled(user, entries)

    monkeypatch.setattr(intake, "_settled", held_settled)
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
        reached.set()
        emulator_module.request_observers.pop()
        emulator_module.request_observers.pop()
    assert counts, "the favourite never reached a"
    assert counts[0] > 0, "the favourite reached a after the whole bulk action"
    await cluster.wait_items([b], items, PLAYED)


async def test_the_users_last_action_wins_in_the_middle_of_a_sliced_apply(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
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
    pacing = Pacing(cluster, monkeypatch, await cluster.key("a", last))
    gate_a.release()
    # a's bulk action is being applied, its last item still to come, when b's change arrives.
    await pacing.wait_holding(cluster)
    gate_b.release()
    await cluster.wait_all_hold(last, resumed)
    await cluster.wait_items([b], items[:-1], PLAYED)
    await cluster.settle()
    assert cluster.all_hold(last, resumed)
    assert all(cluster.all_hold(item, PLAYED) for item in items[:-1])


@pytest.mark.parametrize("how", ["reconnect", "periodic"])
async def test_a_catch_up_during_a_sliced_apply_lets_the_later_change_win(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch, how: str
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
    pacing = Pacing(cluster, monkeypatch, await cluster.key("a", last))
    gate_a.release()
    await pacing.wait_holding(cluster)
    if how == "reconnect":
        # b's socket drops while a's bulk action is being applied: jfsync catches b up.
        await b.drop_sockets()
    else:
        # The periodic reconcile catches b up while a's bulk action is being applied.
        await cluster.service.reconciler.catch_up("b", cluster.uid(b), USER_KEY)
    await cluster.wait_all_hold(last, resumed)
    await cluster.wait_items([b], items[:-1], PLAYED)
    await cluster.settle()
    assert cluster.all_hold(last, resumed)


async def test_a_live_change_between_two_catch_up_slices_goes_first_and_wins(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user plays a bit of many films on b (progress is saved without a push: only a
    catch-up of b finds it). While the catch-up applies what it found, a slice at a time, the
    user goes back into the first of those films on a and moves on in it. That change reaches
    b before the catch-up's next slice (live work goes first), and it is what every server
    keeps; the catch-up's other findings land everywhere too."""
    monkeypatch.setattr(reconcile_module, "SCAN_BATCH", 2)
    monkeypatch.setattr(reconcile_module, "LIVE_SCAN_BATCH", 2)
    # A bound on how long a catch-up step gives way, never waited out here: large, so that
    # order decides, not the speed of the machine.
    monkeypatch.setattr(priority_module, "MAX_YIELD_S", 30.0)
    cluster = await make_cluster(2, leaves=40)
    a, b = cluster.emus
    items = cluster.free_items[:20]
    found = {
        item: cluster.change(b, item, reason="PlaybackProgress", position_ticks=5_000_000)
        for item in items
    }
    keys = {await cluster.key("b", item): item for item in items}
    ledger = cluster.service.ledger
    apply = ledger.apply_observations
    scan_slices = 0
    first: str | None = None
    later: UserData | None = None
    live_applied = False
    at_write: list[int] = []

    def note(emu: Emulator, record: RequestRecord) -> None:
        if emu is b and record.method == "POST" and first is not None and first in record.path:
            at_write.append(scan_slices)

    async def apply_in_slices(observations: Sequence[Observation], **options: Any) -> list[Applied]:
        nonlocal scan_slices, first, later, live_applied
        result = await apply(observations, **options)
        if any(o.source == "event" and o.server == "a" and o.state == later for o in observations):
            live_applied = True
        scan = [o for o in observations if o.source == "scan" and o.server == "b"]
        if scan:
            scan_slices += 1
        if scan and scan_slices == 1:
            first = keys[scan[0].item]
            # What the first slice found reached a (and its echo came back): the user's next
            # action there is later.
            await cluster.wait_all_hold(first, found[first])
            later = cluster.change(a, first, position_ticks=9_000_000)
            await a.flush_now()
            await cluster.wait(lambda: live_applied)
        return result

    monkeypatch.setattr(ledger, "apply_observations", apply_in_slices)
    emulator_module.request_observers.append(note)
    try:
        result = await cluster.service.reconciler.catch_up("b", cluster.uid(b), USER_KEY)
        assert result.changed == len(items)
        assert first is not None
        assert later is not None
        await cluster.wait_all_hold(first, later)
    finally:
        emulator_module.request_observers.remove(note)
    # The live change went to b before the catch-up applied its second slice of ten.
    assert at_write[0] == 1
    assert scan_slices == len(items) // 2
    rest = [item for item in items if item != first]
    await cluster.wait(lambda: all(cluster.all_hold(item, found[item]) for item in rest))
    await cluster.settle()
    assert cluster.all_hold(first, later)
    assert all(cluster.all_hold(item, found[item]) for item in rest)
