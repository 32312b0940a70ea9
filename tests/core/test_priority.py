"""Live work first: a catch-up step waits for the live work under way, and never for long.

:class:`jfsync.sync.priority.LiveFirst` is what keeps a user's change from queueing behind a
catch-up: while events flow, each step of a catch-up first waits for the applies and deliveries
of live changes under way. These tests hold its rules: nothing is waited for while no event
flows (a first reconcile runs at full speed), a step waits until every piece of live work under
way has ended (they overlap and nest), and it never waits longer than its bound (a delivery
that hangs slows a catch-up, never stops it). Order decides, not the machine's speed: the
bound is made large where a test waits for the work to end, and tiny where it is the point.
"""

from __future__ import annotations

import asyncio

import pytest

from jfsync.sync import priority as priority_module
from jfsync.sync.priority import ARRIVAL_TURNS, LIVE_WINDOW_S, LiveFirst
from jfsync.timing import ManualClock
from tests.support.waiting import bound

pytestmark = pytest.mark.timeout(10)


async def turns(count: int = 5) -> None:
    """Let the loop run whatever is ready, a few times over (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A give-way bound never reached here: what ends a wait is the live work ending."""
    monkeypatch.setattr(priority_module, "MAX_YIELD_S", 30.0)


async def test_nothing_is_waited_for_while_no_event_flows() -> None:
    """Live work under way (a delivery of older rows) but no event received: a step of a
    catch-up (a first reconcile, a catch-up after a restart) goes on at once."""
    live = LiveFirst(ManualClock())
    release = live.hold()
    assert not live.flowing()
    await asyncio.wait_for(live.step(), bound(1.0))
    release()


async def test_events_flow_for_a_while_after_the_last_one() -> None:
    clock = ManualClock()
    live = LiveFirst(clock)
    live.event()
    assert live.flowing()
    await clock.advance(LIVE_WINDOW_S - 0.1)
    assert live.flowing()
    await clock.advance(0.2)
    assert not live.flowing()
    release = live.hold()
    await asyncio.wait_for(live.step(), bound(1.0))  # nothing flows: no waiting
    release()


@pytest.mark.usefixtures("patient")
async def test_a_step_waits_until_every_piece_of_live_work_has_ended() -> None:
    """An event is applied while a delivery round of an earlier one is under way: the step
    waits for both, whichever ends first."""
    live = LiveFirst(ManualClock())
    live.event()
    round_ = live.hold()
    step = asyncio.ensure_future(live.step())
    try:
        with live.working():
            await turns()
            assert not step.done()
            round_()
            await turns()
            assert not step.done(), "the step went on while an apply was under way"
        await asyncio.wait_for(step, bound(1.0))
    finally:
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
    assert not live.busy


@pytest.mark.usefixtures("patient")
async def test_a_change_arriving_during_a_step_is_waited_for_before_the_next() -> None:
    """A websocket frame that arrived while a step of a catch-up ran needs a few turns of the
    loop (the transport's read, the websocket reader, the subscriber) before the intake holds
    it as live work: the step that follows gives it those turns, then waits for it, so the
    change goes in ahead of the catch-up's next step, not behind several."""
    live = LiveFirst(ManualClock())
    live.event()
    applied = asyncio.Event()
    order: list[str] = []

    async def arriving() -> None:
        for _ in range(ARRIVAL_TURNS - 1):  # the hops from the transport to the intake
            await asyncio.sleep(0)
        with live.working():
            order.append("change")
            await applied.wait()

    async def catch_up() -> None:
        await live.step()
        order.append("catch-up step")

    change = asyncio.ensure_future(arriving())
    step = asyncio.ensure_future(catch_up())
    try:
        await turns(2 * ARRIVAL_TURNS)
        assert order == ["change"]
        applied.set()
        await asyncio.wait_for(asyncio.gather(change, step), bound(1.0))
    finally:
        for task in (change, step):
            task.cancel()
        await asyncio.gather(change, step, return_exceptions=True)
    assert order == ["change", "catch-up step"]


async def test_releasing_twice_frees_nothing_more() -> None:
    live = LiveFirst(ManualClock())
    first = live.hold()
    second = live.hold()
    first()
    first()
    assert live.busy, "a second release of one hold ended another's"
    second()
    assert not live.busy


async def test_a_step_never_waits_longer_than_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery that hangs keeps live work under way for good: each step still goes on
    after the bound, so a catch-up is slowed, never stopped."""
    monkeypatch.setattr(priority_module, "MAX_YIELD_S", 0.001)
    live = LiveFirst(ManualClock())
    live.event()
    release = live.hold()
    for _ in range(3):
        await asyncio.wait_for(live.step(), bound(2.0))
    assert live.busy
    release()


@pytest.mark.usefixtures("patient")
async def test_a_cancelled_step_leaves_the_live_work_as_it_was() -> None:
    """A catch-up stopped while it gives way (the service stops) takes nothing with it: the
    live work under way still counts, and a later step still waits for it."""
    live = LiveFirst(ManualClock())
    live.event()
    release = live.hold()
    step = asyncio.ensure_future(live.step())
    await turns()
    step.cancel()
    await asyncio.gather(step, return_exceptions=True)
    assert step.cancelled()
    assert live.busy
    again = asyncio.ensure_future(live.step())
    await turns()
    assert not again.done()
    release()
    await asyncio.wait_for(again, bound(1.0))
