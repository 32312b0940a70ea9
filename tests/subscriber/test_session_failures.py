"""A session that fails in a way nobody planned for ends, and the subscriber reconnects.

Against the scripted peer: the event handler raising on a live event, the socket's reader
choking on a frame, and a bug inside the session each end that session with a reason on the
status (never CONNECTED while nothing reads), back off on the clock, reconnect, and resync
before the next live event; the failure is logged once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from jfsync.jellyfin import socket as socket_module
from jfsync.sync.subscriber import (
    Subscriber,
    SubscriberEvent,
    SubscriberState,
    UserDataChangedEvent,
)
from jfsync.timing import ManualClock

from .helpers import RawServer, Recorder
from .test_subscriber_policy import (
    USER_ID,
    Resyncs,
    Tokens,
    backoff_sleep,
    connected,
    fixed_delays,
    item_id,
    user_data_frame,
)

pytestmark = pytest.mark.timeout(30)

State = SubscriberState
MakeSubscriber = Callable[..., Subscriber]


class FailingOnce(Recorder):
    """Records every event; raises ``error`` on the first UserDataChanged."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error: Exception | None = error

    async def __call__(self, event: SubscriberEvent) -> None:
        """Fail on the first live user-data event, record the rest."""
        if isinstance(event, UserDataChangedEvent) and self.error is not None:
            error, self.error = self.error, None
            raise error
        await super().__call__(event)


@pytest.fixture
async def make_subscriber(clock: ManualClock) -> AsyncIterator[MakeSubscriber]:
    made: list[Subscriber] = []

    def factory(url: str, on_event: Recorder, resync: Resyncs) -> Subscriber:
        sub = Subscriber(
            "alpha",
            url,
            USER_ID,
            "alice",
            "jfsync-alpha-alice",
            get_token=Tokens(),
            on_event=on_event,
            resync=resync,
            clock=clock,
            delays=fixed_delays,
        )
        made.append(sub)
        sub.start()
        return sub

    yield factory
    for sub in made:
        await sub.stop()


def lines_at_warning(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The subscriber's WARNING and ERROR records."""
    return [
        r
        for r in caplog.records
        if r.name == "jfsync.sync.subscriber" and r.levelno >= logging.WARNING
    ]


def failing_once(real: Callable[[Any], Any], error: Exception) -> Callable[[Any], Any]:
    """``real``, but raising ``error`` the first time it is called (an injected bug)."""
    calls: list[Any] = []

    def call(arg: Any) -> Any:
        calls.append(arg)
        if len(calls) == 1:
            raise error
        return real(arg)

    return call


async def reconnects_and_delivers(
    sub: Any, raw_server: RawServer, clock: ManualClock, resync: Resyncs, handler: Recorder
) -> None:
    """After its 1 s backoff the subscriber connects again, resyncs, and the next event of the
    new session reaches the handler."""
    await clock.advance(1.0)
    fresh = await connected(sub, raw_server)
    assert resync.count == 2
    await fresh.send(user_data_frame(2))
    events = await handler.wait_user_data(1)
    assert [e.entries[0].item_id for e in events] == [item_id(2)]


async def test_an_event_the_handler_fails_on_ends_the_session_and_a_resync_catches_up(
    raw_server: RawServer,
    make_subscriber: MakeSubscriber,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "jfsync.sync.subscriber")
    handler = FailingOnce(RuntimeError("database is locked"))
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, handler, resync)
    conn = await connected(sub, raw_server)
    assert resync.count == 1

    await conn.send(user_data_frame(1))  # applying it fails
    assert await backoff_sleep(sub, clock) == 1.0
    status = sub.status
    assert status.state is State.BACKOFF
    assert status.connected_since_ms is None
    assert status.pause_reason == "applying UserDataChangedEvent failed: RuntimeError"
    assert status.event_failures == 1
    async with asyncio.timeout(5):
        await conn.ws.receive()  # the old socket was closed by jfsync
    assert conn.ws.closed

    await clock.advance(1.0)
    fresh = await connected(sub, raw_server)
    # The resync after the reconnect stands for the event that could not be applied.
    assert resync.count == 2
    await fresh.send(user_data_frame(3))
    events = await handler.wait_user_data(1)
    assert [e.entries[0].item_id for e in events] == [item_id(3)]
    assert sub.status.event_failures == 1
    assert sub.status.last_event_error == "applying UserDataChangedEvent failed: RuntimeError"
    (line,) = lines_at_warning(caplog)
    assert line.levelno == logging.ERROR
    assert "applying UserDataChangedEvent failed" in line.getMessage()
    assert line.exc_info is not None
    assert any("events apply again" in r.getMessage() for r in caplog.records)


async def test_a_frame_nested_too_deep_is_skipped_and_the_session_goes_on(
    raw_server: RawServer,
    make_subscriber: MakeSubscriber,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Valid JSON nested deeper than the parser can recurse is a malformed message: logged and
    skipped (it used to crash the reader with RecursionError)."""
    handler = Recorder()
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, handler, resync)
    conn = await connected(sub, raw_server)

    await conn.send("[" * 100_000 + "]" * 100_000)
    await conn.send(user_data_frame(2))
    events = await handler.wait_user_data(1)
    assert [e.entries[0].item_id for e in events] == [item_id(2)]
    assert resync.count == 1
    assert sub.status.connected_since_ms is not None
    (line,) = lines_at_warning(caplog)
    assert "malformed" in line.getMessage().lower()


async def test_a_reader_that_fails_unexpectedly_ends_the_session_and_it_reconnects(
    raw_server: RawServer,
    make_subscriber: MakeSubscriber,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Recorder()
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, handler, resync)
    conn = await connected(sub, raw_server)
    bug = RuntimeError("a bug in the reader")
    monkeypatch.setattr(
        socket_module, "parse_message", failing_once(socket_module.parse_message, bug)
    )
    await conn.send(user_data_frame(1))
    assert await backoff_sleep(sub, clock) == 1.0
    assert sub.status.connected_since_ms is None
    assert "websocket reader failed: RuntimeError" in (sub.status.last_error or "")

    await reconnects_and_delivers(sub, raw_server, clock, resync, handler)
    (line,) = lines_at_warning(caplog)
    assert "RuntimeError" in line.getMessage()


async def test_a_bug_inside_a_session_ends_it_and_the_subscriber_reconnects(
    raw_server: RawServer,
    make_subscriber: MakeSubscriber,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Recorder()
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, handler, resync)
    conn = await connected(sub, raw_server)
    bug = KeyError("a bug in turning a message into an event")
    monkeypatch.setattr(sub, "_event_for", failing_once(sub._event_for, bug))
    await conn.send(user_data_frame(1))
    assert await backoff_sleep(sub, clock) == 1.0
    assert sub.status.connected_since_ms is None
    assert sub.status.last_error == "unexpected error: KeyError"

    await reconnects_and_delivers(sub, raw_server, clock, resync, handler)
    (line,) = lines_at_warning(caplog)
    assert line.levelno == logging.ERROR
    assert line.exc_info is not None
