"""JellyfinSocket against a scripted peer on loopback: handshake, keepalive, errors, bad frames.

Time only moves through the ManualClock; real time is used only as a bound on loopback I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from jfsync import __version__
from jfsync.errors import AuthRejectedError, NotFoundError, RequestTimeoutError, UnreachableError
from jfsync.jellyfin.messages import (
    LibraryChangedMessage,
    ServerRestartingMessage,
    UserDataChangedMessage,
)
from jfsync.jellyfin.socket import (
    JellyfinSocket,
    KeepAliveTimeoutError,
    SocketClosedError,
    socket_url,
)
from jfsync.timing import ManualClock

from .helpers import IO_TIMEOUT_S, RawServer

TOKEN = "f00dfeedf00dfeedf00dfeedf00dfeed"
USER_ID = "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
ITEM_ID = "9f86d081884c7d659a2feaa0c55ad015"

OpenSocket = Callable[..., Coroutine[Any, Any, JellyfinSocket]]


@pytest.fixture
async def open_socket(clock: ManualClock) -> AsyncIterator[OpenSocket]:
    """Open JellyfinSockets to a URL; every one is closed after the test."""
    opened: list[JellyfinSocket] = []

    async def factory(url: str, token: str = TOKEN) -> JellyfinSocket:
        sock = JellyfinSocket(
            "alpha", url, user="alice", device_id="jfsync-dev-1", token=token, clock=clock
        )
        opened.append(sock)
        await sock.connect()
        return sock

    yield factory
    for sock in opened:
        await sock.close()


async def receive(sock: JellyfinSocket) -> object:
    async with asyncio.timeout(IO_TIMEOUT_S):
        return await sock.receive()


def user_data_frame(played: bool = True) -> dict[str, object]:
    return {
        "MessageType": "UserDataChanged",
        "Data": {
            "UserId": USER_ID,
            "UserDataList": [
                {
                    "PlaybackPositionTicks": 0,
                    "PlayCount": 1,
                    "IsFavorite": False,
                    "Played": played,
                    "ItemId": ITEM_ID,
                }
            ],
        },
        "MessageId": "a" * 32,
    }


def test_socket_url_keeps_the_base_path_and_maps_the_scheme() -> None:
    assert socket_url("http://127.0.0.1:8096") == "ws://127.0.0.1:8096/socket"
    assert socket_url("https://media.example/jellyfin/") == "wss://media.example/jellyfin/socket"


async def test_handshake_sends_the_user_token_and_device_in_the_authorization_header(
    raw_server: RawServer, open_socket: OpenSocket
) -> None:
    sock = await open_socket(raw_server.url)
    conn = await raw_server.next_connection()
    assert conn.path == "/socket"
    assert conn.auth == {
        "Client": "jfsync",
        "Device": "jfsync",
        "DeviceId": "jfsync-dev-1",
        "Version": __version__,
        "Token": TOKEN,
    }
    assert TOKEN not in repr(sock)


async def test_force_keepalive_is_answered_at_once_and_keepalive_sent_every_30_s(
    raw_server: RawServer, open_socket: OpenSocket, clock: ManualClock
) -> None:
    start = clock.monotonic()
    sock = await open_socket(raw_server.url)
    conn = await raw_server.next_connection()
    # The server's ForceKeepAlive on bind is answered without the clock moving.
    assert await conn.next_received() == {"MessageType": "KeepAlive"}
    assert sock.keepalives_sent == [start]

    for n in range(1, 4):
        await clock.wait_for_sleepers(1)
        await clock.advance(29.9)
        assert conn.received.empty(), "a KeepAlive went out before 30 s"
        await clock.advance(0.1)
        assert await conn.next_received() == {"MessageType": "KeepAlive"}
        assert sock.keepalives_sent[-1] == pytest.approx(start + 30 * n)
    assert sock.keepalive_replies >= 3

    # Another ForceKeepAlive mid-interval is answered at once and restarts the 30 s.
    await clock.advance(10)
    await conn.send({"MessageType": "ForceKeepAlive", "Data": 60})
    assert await conn.next_received() == {"MessageType": "KeepAlive"}
    assert sock.keepalives_sent[-1] == pytest.approx(start + 100)
    await clock.wait_for_sleepers(1)
    await clock.advance(29.9)
    assert conn.received.empty()
    await clock.advance(0.1)
    assert await conn.next_received() == {"MessageType": "KeepAlive"}
    assert sock.is_open


async def test_missing_keepalive_reply_declares_the_socket_dead(
    raw_server: RawServer, open_socket: OpenSocket, clock: ManualClock
) -> None:
    sock = await open_socket(raw_server.url)
    conn = await raw_server.next_connection()
    await conn.next_received()  # the answer to ForceKeepAlive, replied to
    conn.reply_keepalive = False  # half-open from here: the peer reads nothing back
    await clock.wait_for_sleepers(1)
    await clock.advance(30)
    await conn.next_received()  # KeepAlive sent, never answered
    await clock.wait_for_sleepers(1)
    await clock.advance(19.9)
    assert sock.is_open
    await clock.advance(0.1)
    with pytest.raises(KeepAliveTimeoutError, match="no KeepAlive reply within 20 s"):
        await receive(sock)
    assert not sock.is_open


async def test_live_messages_arrive_in_order_and_bad_frames_are_skipped(
    raw_server: RawServer, open_socket: OpenSocket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="jfsync.jellyfin.socket")
    sock = await open_socket(raw_server.url)
    conn = await raw_server.next_connection()
    await conn.send("this is not json")
    await conn.send({"MessageType": "ScheduledTasksInfo", "Data": [], "MessageId": "b" * 32})
    await conn.send({"MessageType": "UserDataChanged", "Data": {"UserId": "not-an-id"}})
    await conn.send(user_data_frame())
    await conn.ws.send_bytes(b"\xff\x00")
    await conn.send({"MessageType": "LibraryChanged", "Data": {"ItemsAdded": [ITEM_ID]}})
    await conn.send({"MessageType": "ServerRestarting"})

    first = await receive(sock)
    assert isinstance(first, UserDataChangedMessage)
    assert first.data.user_data_list[0].item_id == ITEM_ID
    assert isinstance(await receive(sock), LibraryChangedMessage)
    assert isinstance(await receive(sock), ServerRestartingMessage)
    assert sock.is_open

    skipped = [r for r in caplog.records if "skipped a websocket frame" in r.getMessage()]
    assert len(skipped) == 3
    assert all(r.levelno == logging.WARNING for r in skipped)
    assert all("[alpha/alice]" in r.getMessage() for r in skipped)
    ignored = [
        r for r in caplog.records if "ignored a ScheduledTasksInfo message" in r.getMessage()
    ]
    assert [r.levelno for r in ignored] == [logging.DEBUG]
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_upgrade_is_an_auth_error_without_the_token(
    raw_server: RawServer, open_socket: OpenSocket, status: int
) -> None:
    raw_server.valid_tokens = {"some-other-token"}
    raw_server.reject_status = status
    with pytest.raises(AuthRejectedError) as info:
        await open_socket(raw_server.url)
    assert info.value.status == status
    assert info.value.server == "alpha"
    assert TOKEN not in str(info.value)


async def test_other_refusals_map_to_their_status_error(
    raw_server: RawServer, open_socket: OpenSocket
) -> None:
    raw_server.valid_tokens = set()
    raw_server.reject_status = 404
    with pytest.raises(NotFoundError, match="/socket -> HTTP 404"):
        await open_socket(raw_server.url)


async def test_an_upgrade_that_never_answers_times_out_on_the_clock(
    open_socket: OpenSocket, clock: ManualClock
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        opening = asyncio.create_task(open_socket(f"http://127.0.0.1:{port}"), name="opening")
        await clock.wait_for_sleepers(1)
        assert clock.pending_sleeps == [10.0]
        await clock.advance(9.9)
        assert not opening.done()
        await clock.advance(0.1)
        with pytest.raises(RequestTimeoutError, match="no answer within 10"):
            async with asyncio.timeout(IO_TIMEOUT_S):
                await opening
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_nobody_listening_is_unreachable(open_socket: OpenSocket) -> None:
    probe = RawServer()
    await probe.start()
    url = probe.url
    await probe.stop()
    with pytest.raises(UnreachableError) as info:
        await open_socket(url)
    assert "[alpha]" in str(info.value)


async def test_server_close_ends_the_stream_with_socket_closed(
    raw_server: RawServer, open_socket: OpenSocket
) -> None:
    sock = await open_socket(raw_server.url)
    conn = await raw_server.next_connection()
    await conn.send(user_data_frame())
    await conn.close(code=1001)
    # What arrived before the close is still delivered, then the close is reported.
    assert isinstance(await receive(sock), UserDataChangedMessage)
    with pytest.raises(SocketClosedError, match="1001"):
        await receive(sock)


async def test_close_by_us_ends_the_stream_quietly(
    raw_server: RawServer, open_socket: OpenSocket
) -> None:
    sock = await open_socket(raw_server.url)
    await raw_server.next_connection()
    await sock.close()
    assert await receive(sock) is None
    assert await receive(sock) is None
    assert [m async for m in sock] == []
