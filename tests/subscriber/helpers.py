"""Helpers for the websocket and subscriber tests: a scripted raw peer and an event recorder.

:class:`RawServer` is a tiny aiohttp websocket server on 127.0.0.1 whose every frame the test
chooses (bad JSON, unknown types, silence), for what the emulator does not do on purpose.
:class:`Recorder` collects what a Subscriber hands to ``on_event`` and lets a test wait for it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import WSMsgType, web

from jfsync.sync.subscriber import (
    ConnectionStateChanged,
    Subscriber,
    SubscriberEvent,
    SubscriberState,
    UserDataChangedEvent,
)
from tests.support.waiting import wait_until

#: Real-time bound for waiting on loopback I/O; never a wait for the clock.
IO_TIMEOUT_S = 5.0

_PAIR = re.compile(r'(\w+)="([^"]*)"')


def parse_authorization(value: str) -> dict[str, str]:
    """Split an ``Authorization: MediaBrowser k="v", ...`` value into decoded pairs."""
    assert value.startswith("MediaBrowser "), value
    return {k: unquote(v) for k, v in _PAIR.findall(value)}


@dataclass
class RawConn:
    """One accepted websocket on the raw server."""

    ws: web.WebSocketResponse
    auth: dict[str, str]
    path: str
    received: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    #: Answer inbound KeepAlive as Jellyfin does; set False to play a half-open peer.
    reply_keepalive: bool = True

    async def send(self, payload: str | dict[str, Any]) -> None:
        """Send one text frame (a dict is sent as JSON)."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        await self.ws.send_str(text)

    async def next_received(self) -> dict[str, Any]:
        """Wait (on I/O, bounded) for the next frame the client sent, parsed."""
        async with asyncio.timeout(IO_TIMEOUT_S):
            return json.loads(await self.received.get())  # type: ignore[no-any-return]

    async def close(self, code: int = 1001) -> None:
        """Close from the server side."""
        await self.ws.close(code=code)


class RawServer:
    """A scripted websocket peer on loopback: tests decide every frame it sends."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[RawConn] = asyncio.Queue()
        self.all_connections: list[RawConn] = []
        #: When set, only these tokens may upgrade; others get ``reject_status``.
        self.valid_tokens: set[str] | None = None
        self.reject_status = 403
        #: Sent at once on every accepted connection, as Jellyfin does for a user session.
        self.force_keepalive_on_connect = True
        self.upgrade_attempts = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL in the form a config gives it."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a free port the first time, the same port afterwards)."""
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Close every socket and stop listening (the port stays reserved for start())."""
        for conn in self.all_connections:
            if not conn.ws.closed:
                await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def next_connection(self) -> RawConn:
        """Wait (on I/O, bounded) for the next accepted websocket."""
        async with asyncio.timeout(IO_TIMEOUT_S):
            return await self.connections.get()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.upgrade_attempts += 1
        auth = parse_authorization(request.headers.get("Authorization", "MediaBrowser "))
        if self.valid_tokens is not None and auth.get("Token") not in self.valid_tokens:
            return web.Response(status=self.reject_status)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = RawConn(ws=ws, auth=auth, path=request.path)
        self.all_connections.append(conn)
        if self.force_keepalive_on_connect:
            await conn.send({"MessageType": "ForceKeepAlive", "Data": 60, "MessageId": "0" * 32})
        self.connections.put_nowait(conn)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            conn.received.put_nowait(msg.data)
            if conn.reply_keepalive and json.loads(msg.data).get("MessageType") == "KeepAlive":
                await conn.send({"MessageType": "KeepAlive", "MessageId": "1" * 32})
        return ws


async def state(sub: Subscriber, *states: SubscriberState) -> SubscriberState:
    """Wait until the subscriber is in one of ``states`` (bounded real time); return it."""
    async with asyncio.timeout(IO_TIMEOUT_S):
        return await sub.wait_for_state(*states)


class Recorder:
    """Collects the events a Subscriber delivers; tests wait for them on events, not time."""

    def __init__(self) -> None:
        self.events: list[SubscriberEvent] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: SubscriberEvent) -> None:
        """The ``on_event`` callback."""
        self.events.append(event)
        self._changed.set()

    @property
    def states(self) -> list[SubscriberState]:
        """Every state the subscriber announced, in order."""
        return [e.state for e in self.events if isinstance(e, ConnectionStateChanged)]

    @property
    def user_data(self) -> list[UserDataChangedEvent]:
        """Every UserDataChanged event, in order."""
        return [e for e in self.events if isinstance(e, UserDataChangedEvent)]

    async def wait_for(
        self, predicate: Callable[[list[SubscriberEvent]], bool], timeout_s: float = IO_TIMEOUT_S
    ) -> None:
        """Wait until ``predicate(events)`` holds (bounded real time for loopback I/O)."""
        await wait_until(lambda: predicate(self.events), timeout_s, changed=self._changed)

    async def wait_user_data(self, count: int) -> list[UserDataChangedEvent]:
        """Wait until ``count`` UserDataChanged events arrived; return them all."""
        await self.wait_for(lambda _: len(self.user_data) >= count)
        return self.user_data
