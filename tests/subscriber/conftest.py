"""Fixtures for the websocket and subscriber tests: a scripted raw peer, a clock, a recorder."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from jfsync.timing import ManualClock

from .helpers import RawServer, Recorder


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    """A started RawServer, stopped after the test."""
    server = RawServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def clock() -> ManualClock:
    """The clock every subscriber and socket in a test goes through."""
    return ManualClock()


@pytest.fixture
def recorder() -> Recorder:
    """A fresh event recorder."""
    return Recorder()
