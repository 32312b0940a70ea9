"""The one way tests wait: until a condition holds, re-checked on events, bounded in real time.

:func:`wait_until` re-checks a predicate whenever an :class:`asyncio.Event` the test passes is
set (a request answered, a socket frame, an event recorded), or without one after every turn of
the event loop, for state that loopback I/O changes without an event to wait on. It never
sleeps for time: the bound is a timeout that fails the test. :func:`emulator_requests` gives an
event set whenever any emulator answers a request. (A running :class:`SyncService` has its own
``wait_for``, which wakes whenever jfsync applies or writes; cluster helpers use that.)

Every real-time bound goes through :func:`bound`: ``JFSYNC_TEST_TIME_SCALE`` (default 1)
stretches them, and ``tests/conftest.py`` stretches each test's pytest-timeout the same way,
for runs that slow everything down alike (coverage tracing in ``.ci/run``). It never makes a
test wait longer when things go right: waits end as soon as their condition holds.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from jfsync import emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord


def time_scale() -> float:
    """``JFSYNC_TEST_TIME_SCALE`` as a factor of at least 1 (a bad value is an error)."""
    text = os.environ.get("JFSYNC_TEST_TIME_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"JFSYNC_TEST_TIME_SCALE must be a number >= 1, not {text!r}") from None
    if not scale >= 1:
        raise ValueError(f"JFSYNC_TEST_TIME_SCALE must be a number >= 1, not {text!r}")
    return scale


TIME_SCALE = time_scale()


def bound(seconds: float) -> float:
    """A real-time bound of ``seconds``, stretched by ``JFSYNC_TEST_TIME_SCALE``."""
    return seconds * TIME_SCALE


#: Real-time bound on one wait for loopback I/O; never a wait for time to pass.
WAIT_S = 20.0

Predicate = Callable[[], bool | Awaitable[bool]]


async def _holds(predicate: Predicate) -> bool:
    value = predicate()
    if inspect.isawaitable(value):
        value = await value
    return bool(value)


async def wait_until(
    predicate: Predicate, timeout_s: float = WAIT_S, *, changed: asyncio.Event | None = None
) -> None:
    """Return once ``predicate()`` holds (it may be async); fail after ``timeout_s``.

    With ``changed`` the predicate is re-checked each time the event is set (it is cleared
    before each wait, so nothing set in between is lost); without it, after each loop turn.
    """
    async with asyncio.timeout(bound(timeout_s)):
        while not await _holds(predicate):
            if changed is None:
                await asyncio.sleep(0)  # one loop turn, not time
            else:
                changed.clear()
                if await _holds(predicate):
                    return
                await changed.wait()


@contextmanager
def emulator_requests() -> Iterator[asyncio.Event]:
    """An event set whenever any emulator records a request, while the block runs."""
    changed = asyncio.Event()

    def observe(_emu: Emulator, _record: RequestRecord) -> None:
        changed.set()

    emulator_module.request_observers.append(observe)
    try:
        yield changed
    finally:
        emulator_module.request_observers.remove(observe)
