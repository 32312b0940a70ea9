"""The session watcher against a scripted peer: a refused sessions websocket means polling."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from jfsync.jellyfin.api import JellyfinClient
from jfsync.sync.sessions import PlaybackRead, SessionWatcher, WatcherState
from jfsync.timing import ManualClock

from .helpers import IO_TIMEOUT_S, RawServer

pytestmark = pytest.mark.timeout(30)

KEY = "0123456789abcdef0123456789abcdef"


async def test_a_proxy_refusing_the_sessions_websocket_makes_the_watcher_poll(
    raw_server: RawServer, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="jfsync.sync.sessions")
    # The proxy answers 404 to everything but plain requests it knows (none here).
    raw_server.valid_tokens = set()
    raw_server.reject_status = 404
    reads: list[PlaybackRead] = []

    async def on_reads(server: str, batch: list[PlaybackRead]) -> None:
        reads.extend(batch)

    async with aiohttp.ClientSession() as http:
        client = JellyfinClient("alpha", raw_server.url, KEY, session=http, device_id="jfsync-t")
        watcher = SessionWatcher(
            "alpha",
            raw_server.url,
            client,
            api_key=KEY,
            version=(10, 11, 11),
            clock=clock,
            on_reads=on_reads,
            quiet_s=60.0,
        )
        assert watcher.mode == "socket"
        watcher.start()
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                await watcher.wait_for_state(WatcherState.BACKOFF)
            assert watcher.mode == "poll"
            assert "reading GET /Sessions every 10 s instead" in caplog.text
            # The next attempt polls (here refused too: shown, retried, nothing read).
            await clock.advance(2.0)
            async with asyncio.timeout(IO_TIMEOUT_S):
                await watcher.wait_for(lambda: "GET /Sessions" in (watcher.status.last_error or ""))
            assert watcher.status.last_error == "GET /Sessions -> HTTP 404"
            assert reads == []
            assert KEY not in caplog.text
        finally:
            await watcher.stop()
    assert watcher.status.state is WatcherState.STOPPED
