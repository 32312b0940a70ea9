"""Injected time: the clock every timer in jfsync (and its emulator) goes through, and backoff.

Production code takes a :class:`Clock` and never calls ``time`` or ``asyncio.sleep`` directly,
so tests drive time with :class:`ManualClock` instead of waiting it out. ``SystemClock`` is the
real one. :func:`backoff_delays` yields capped exponential delays with jitter for reconnect
loops; the pusher uses tenacity with the same clock's ``sleep``. :func:`one_turn` lets the
loop run once, without time passing, between the steps of a long pass.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import Iterator
from typing import Protocol


class Clock(Protocol):
    """Where code reads time and sleeps."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for timeouts and ages)."""
        ...

    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch (for stamps and dates)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the caller for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    def wall_ms(self) -> int:
        """Return the wall clock in milliseconds."""
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        """Sleep with ``asyncio.sleep``."""
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that only moves when told to; sleepers wake as :meth:`advance` passes them.

    ``sleep(0)`` and negative sleeps return after one loop turn without waiting for ``advance``.
    """

    def __init__(
        self, start_wall_ms: int = 1_750_000_000_000, start_monotonic: float = 1000.0
    ) -> None:
        self._monotonic = start_monotonic
        self._wall_offset_ms = start_wall_ms - int(start_monotonic * 1000)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def monotonic(self) -> float:
        """Return the manual monotonic time."""
        return self._monotonic

    def wall_ms(self) -> int:
        """Return the manual wall time in milliseconds."""
        return self._wall_offset_ms + round(self._monotonic * 1000)

    def jump_wall(self, delta_ms: int) -> None:
        """Move the wall clock alone (a clock jump) without waking any sleeper."""
        self._wall_offset_ms += delta_ms

    async def sleep(self, seconds: float) -> None:
        """Wait until :meth:`advance` reaches now + ``seconds``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._monotonic + seconds, next(self._seq), fut))
        self._changed.set()
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()

    @property
    def pending_sleeps(self) -> list[float]:
        """Seconds from now until each live sleeper wakes, soonest first."""
        return sorted(d - self._monotonic for d, _, f in self._sleepers if not f.done())

    async def wait_for_sleepers(self, count: int = 1, timeout_s: float = 5.0) -> None:
        """Wait (on events, not time) until at least ``count`` sleepers are parked."""
        async with asyncio.timeout(timeout_s):
            while len(self.pending_sleeps) < count:
                self._changed.clear()
                await self._changed.wait()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers in deadline order.

        After each wake-up the loop is given a few turns so that woken code can run and park
        new sleepers that are also due inside the window.
        """
        target = self._monotonic + seconds
        while True:
            await _settle()
            self._drop_cancelled()
            if not self._sleepers or self._sleepers[0][0] > target:
                break
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._monotonic = max(self._monotonic, deadline)
            if not fut.done():
                fut.set_result(None)
        self._monotonic = target
        await _settle()

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)


async def one_turn() -> None:
    """Give the event loop one turn (no time passes): what a long pass awaits between steps."""
    await asyncio.sleep(0)


async def _settle(turns: int = 5) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def backoff_delays(
    base_s: float = 1.0,
    cap_s: float = 60.0,
    factor: float = 2.0,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield capped exponential delays, each spread by +/- ``jitter`` (a fraction).

    The un-jittered sequence is base, base*factor, ... up to ``cap_s``; jitter never takes a
    delay above ``cap_s`` or below zero. Start a new iterator to reset after a healthy period.
    """
    pick = rng or random.Random()
    delay = base_s
    while True:
        spread = delay * jitter
        yield max(0.0, min(cap_s, delay + pick.uniform(-spread, spread)))
        delay = min(cap_s, delay * factor)
