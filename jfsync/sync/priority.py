"""Live work first: what a catch-up yields to while the user's changes are being replicated.

A catch-up (:mod:`jfsync.sync.reconcile`) of a large server is background work: listing,
validating and diffing thousands of items, and applying what differs. The live path (a
``UserDataChanged`` event through the intake, then its pusher's read, compare, write and
record) is what the user waits for. Both run in one process, on one event loop, one ledger
thread and one GIL, so a catch-up running flat out adds its work to every event's latency
(a p99 of 55 ms at 100 changes per second on a 2-core machine).

:class:`LiveFirst` is the one place both sides meet. The intake notes each event of a synced
user (:meth:`LiveFirst.event`) and holds :meth:`LiveFirst.working` while it applies one; a
pusher woken by such an apply (the event queued a write for its peer) holds it from then to the
end of the delivery round that follows, so an event counts as live work until its writes are
recorded. Deliveries of what the catch-ups themselves found are not live work. A catch-up calls
:meth:`LiveFirst.step` between its steps (a hundred items validated, a page of the
last-known states it diffs against, a transaction of what it found, a range of the items it
queues for a server that has no history of them): while events flow (one arrived within
:data:`LIVE_WINDOW_S`) it first lets the loop run whatever is ready, then waits for the live
work under way to end, for at most :data:`MAX_YIELD_S` per step, so that a stream of events
can slow a catch-up but never stop it.
Without events flowing a step costs nothing, so the first reconcile and a catch-up after a
restart run at full speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from jfsync.timing import Clock

#: Events count as flowing for this long after the last one arrived.
LIVE_WINDOW_S = 2.0
#: Turns of the event loop a catch-up step gives before it looks for live work under way: a
#: websocket frame needs this many to get from the transport to the intake.
ARRIVAL_TURNS = 4
#: The longest one catch-up step waits for live work to end. A bound on a priority yield, not
#: a wait for anything to happen: it is measured on the event loop's own clock, so that a
#: pusher round held up for long (a slow peer, retries on the injected clock) delays each
#: step of a catch-up by this much at most, whatever clock the service runs on. Under live work
#: that never pauses (a loaded machine, where each change is under way longer than the gap to
#: the next) every give-way runs to this bound, and a catch-up gets step / bound of the loop:
#: with steps of about a millisecond, a twentieth. At 10 ms, twice that, full-size runs on a
#: machine at a load of 4 fell behind the stream (changes queued for up to 0.6 s); the
#: catch-up is what waits instead (it took 6-11 s there).
MAX_YIELD_S = 0.02


class LiveFirst:
    """Tracks live work (events arriving, applies and delivery rounds under way) for the
    catch-ups that give way to it."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        #: When the last event of a synced user arrived (the clock's monotonic time).
        self._event_at: float | None = None
        #: Live work under way (applies of events, delivery rounds).
        self._working = 0
        #: Set whenever no live work is under way.
        self._idle = asyncio.Event()
        self._idle.set()

    def event(self) -> None:
        """Note that an event of a synced user arrived."""
        self._event_at = self._clock.monotonic()

    def flowing(self) -> bool:
        """Tell whether events arrived within the last :data:`LIVE_WINDOW_S`."""
        at = self._event_at
        return at is not None and self._clock.monotonic() - at < LIVE_WINDOW_S

    @property
    def busy(self) -> bool:
        """Whether live work is under way now."""
        return self._working > 0

    def hold(self) -> Callable[[], None]:
        """Count live work as under way until the returned release is called (once; calling
        it again does nothing)."""
        self._working += 1
        self._idle.clear()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._working -= 1
            if not self._working:
                self._idle.set()

        return release

    @contextmanager
    def working(self) -> Iterator[None]:
        """Hold while doing live work (it may nest and overlap with other live work)."""
        release = self.hold()
        try:
            yield
        finally:
            release()

    async def step(self) -> None:
        """Give way to live work between two steps of a catch-up (see the module doc)."""
        if not self.flowing():
            return
        # Whatever live work is ready runs first (and queues its ledger call before ours),
        # and a frame that arrived during the step just ended gets as far as the intake,
        # where it counts as live work: from the socket that takes several turns of the loop
        # (the transport's read, the websocket reader, the subscriber), and with only one a
        # change waited for three more steps of the catch-up on its way in.
        for _ in range(ARRIVAL_TURNS):
            await asyncio.sleep(0)
        if not self._working:
            return
        try:
            async with asyncio.timeout(MAX_YIELD_S):
                await self._idle.wait()
        except TimeoutError:
            pass  # the catch-up goes on: live work may slow it, never stop it


__all__ = ["ARRIVAL_TURNS", "LIVE_WINDOW_S", "MAX_YIELD_S", "LiveFirst"]
