"""The write lane (jfsync/jellyfin/lane.py): the pusher's writes over kept-alive connections.

Over real loopback sockets: the emulator behind a counting forwarder for the normal path, and a
small scripted HTTP server (:class:`ScriptedServer`, asyncio streams) for what a real server or
proxy may answer: chunks with trailers, ``Connection: close``, HTTP/1.0, ``100 Continue``, an
idle connection closed, a reset mid-answer, garbage, error statuses, silence, TLS. The lane
announces itself as ``User-Agent: jfsync/...`` and aiohttp as ``... aiohttp/...``, so every
test can tell which path carried a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from jfsync.errors import (
    AuthRejectedError,
    BadRequestError,
    BadResponseError,
    NotFoundError,
    RateLimitedError,
    RequestTimeoutError,
    ServerError,
    ServerSideError,
    UnreachableError,
)
from jfsync.jellyfin.api import JellyfinClient
from jfsync.model import PlayState, Register, UserData
from tests.client.conftest import API_KEY, MakeEmulator
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

KEY = "5ec12e7a5ec12e7a5ec12e7a5ec12e7a"
USER = "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
ITEMS = [f"{n:032x}" for n in range(1, 41)]
TLS_DIR = Path(__file__).resolve().parents[1] / "data" / "tls"
ANSWER = b'{"PlaybackPositionTicks":0,"PlayCount":1,"IsFavorite":true,"Played":true,"Key":"k"}'
PLAY = frozenset({Register.PLAY_STATE})
FAVOURITE = frozenset({Register.FAVORITE})


def played(count: int = 1) -> UserData:
    return UserData(play_state=PlayState(True, count, 1_750_000_000, 0))


# --------------------------------------------------------------------------- a scripted server


@dataclass
class Seen:
    """One request the scripted server read."""

    conn: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def by_lane(self) -> bool:
        return self.headers.get("user-agent", "").startswith("jfsync/")


Respond = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]


def answer(
    body: bytes = ANSWER,
    status: str = "200 OK",
    version: str = "1.1",
    headers: tuple[str, ...] = (),
    length: bool = True,
) -> bytes:
    """An HTTP answer's bytes."""
    lines = [f"HTTP/{version} {status}", "Content-Type: application/json", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def ok(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """Answer a write as Jellyfin does; keep the connection."""
    writer.write(answer())
    return True


def held_until(release: asyncio.Event) -> Respond:
    """Answer each write as :func:`ok` does, once ``release`` is set."""

    async def held(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return await ok(seen, writer)

    return held


@dataclass
class ScriptedServer:
    """HTTP/1.1 on 127.0.0.1: reads each request whole, then ``respond`` writes the answer
    and says whether to keep the connection. Counts connections; keeps every request."""

    respond: Respond = ok
    tls: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    def lane_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.by_lane]

    def aiohttp_requests(self) -> list[Seen]:
        return [s for s in self.seen if not s.by_lane]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)

    async def stop(self) -> None:
        assert self._server is not None
        self._stopping = True
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The server's stop cancels a handler still answering (a hung one): it then ends
        # quietly (asyncio's streams log a handler task that ends cancelled as an error).
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            if not self._stopping:
                raise

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = self.connections
        self.connections += 1
        self.changed.set()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(conn, method, target, headers, body)
                self.seen.append(seen)
                self.changed.set()
                keep = await self.respond(seen, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()
            self.closed += 1
            self.changed.set()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[ScriptedServer]]]:
    """Start scripted servers; every one is stopped after the test."""
    servers: list[ScriptedServer] = []

    async def start(respond: Respond = ok, tls: ssl.SSLContext | None = None) -> ScriptedServer:
        server = ScriptedServer(respond, tls)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def clients(http: aiohttp.ClientSession) -> AsyncIterator[Callable[..., JellyfinClient]]:
    """Build clients (scripted server's key by default); each is closed after the test."""
    made: list[JellyfinClient] = []

    def make(url: str, *, timeout_s: float = 10.0, verify_tls: bool = True) -> JellyfinClient:
        client = JellyfinClient(
            "srv",
            url,
            KEY,
            session=http,
            device_id="jfsync-rest",
            timeout_s=timeout_s,
            verify_tls=verify_tls,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def write(client: JellyfinClient, item: str = ITEMS[0], count: int = 1) -> None:
    await client.write_user_data(USER, item, played(count), UserData(), PLAY)


def secret_free(err: BaseException, key: str = KEY) -> None:
    """Neither the error nor anything chained to it shows the key."""
    seen: BaseException | None = err
    while seen is not None:
        assert key not in str(seen)
        assert key not in repr(seen)
        seen = seen.__cause__ or seen.__context__


# --------------------------------------------------------------------------- the normal path


@dataclass
class Forwarder:
    """A TCP forwarder in front of an emulator that counts the connections made through it
    and the requests each path sent (the lane's user agent, or another)."""

    target_port: int
    connections: int = 0
    lane_requests: int = 0
    other_requests: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if count:
                        self.lane_requests += data.count(b"\r\nUser-Agent: jfsync/")
                        self.other_requests += data.count(b"aiohttp/")
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        for task in (
            asyncio.create_task(pump(reader, up_writer, True)),
            asyncio.create_task(pump(up_reader, writer, False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def test_a_burst_of_writes_lands_over_at_most_8_kept_connections(
    make_emulator: MakeEmulator, http: aiohttp.ClientSession
) -> None:
    """40 items written 10 at a time: every write lands on the emulator, all of them sent by
    the lane, over at most 8 connections (a silent fallback to aiohttp would show)."""
    emu = await make_emulator()
    forward = Forwarder(int(emu.url.rsplit(":", 1)[1]))
    await forward.start()
    client = JellyfinClient("emu", forward.url, API_KEY, session=http, device_id="jfsync-rest")
    try:
        alice = emu.user_id("alice")
        items = [i.id for i in emu.leaf_items()][:40]
        gate = asyncio.Semaphore(10)

        async def one(item: str) -> None:
            async with gate:
                await client.write_user_data(alice, item, played(), UserData(), PLAY)

        await asyncio.gather(*(one(item) for item in items))
        assert all(emu.user_data(alice, item) == played() for item in items)
        assert forward.lane_requests == len(items)
        assert forward.other_requests == 0
        assert 1 <= forward.connections <= 8
        # Reads stay on aiohttp.
        assert (await client.user_data_of(alice, items[:3]))[items[0]] == played()
        assert forward.other_requests == 1
    finally:
        await client.close()
        await forward.stop()


async def test_sequential_writes_share_one_connection_and_close_leaves_none(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    server = await serve()
    client = clients(server.url)
    for item in ITEMS[:5]:
        await write(client, item)
    assert [s.target for s in server.seen] == [
        f"/UserItems/{item}/UserData?userId={USER}" for item in ITEMS[:5]
    ]
    assert server.connections == 1
    first = server.seen[0]
    assert first.method == "POST"
    assert first.headers["host"] == server.url.removeprefix("http://")
    assert first.headers["content-type"] == "application/json"
    assert first.headers["accept"] == "application/json"
    assert f'Token="{KEY}"' in first.headers["authorization"]
    assert "accept-encoding" not in first.headers
    assert json.loads(first.body)["Played"] is True
    assert first.headers["content-length"] == str(len(first.body))
    await client.close()
    await wait_until(lambda: server.closed == 1, changed=server.changed)
    # After close the client still writes, through aiohttp.
    await write(client, ITEMS[5])
    assert not server.seen[-1].by_lane


async def test_the_clear_requests_go_by_the_lane_too(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    """DELETEs without a body (a rating cleared, a date cleared) and the POST after them."""
    server = await serve()
    client = clients(server.url)
    before = UserData(rating=4.0, play_state=PlayState(True, 2, 1_750_000_000, 0))
    after = UserData(play_state=PlayState(False, 2, None, 0))
    await client.write_user_data(USER, ITEMS[0], after, before, frozenset(Register))
    assert [(s.method, s.target.split("?")[0]) for s in server.seen] == [
        ("DELETE", f"/UserItems/{ITEMS[0]}/Rating"),
        ("DELETE", f"/UserPlayedItems/{ITEMS[0]}"),
        ("POST", f"/UserItems/{ITEMS[0]}/UserData"),
    ]
    assert all(s.by_lane for s in server.seen)
    assert "content-length" not in server.seen[0].headers
    assert server.connections == 1


async def test_a_path_prefix_and_a_default_port_are_sent_as_aiohttp_would(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    server = await serve()
    client = clients(server.url + "/jellyfin/")
    await write(client)
    assert server.seen[0].target == f"/jellyfin/UserItems/{ITEMS[0]}/UserData?userId={USER}"


async def test_at_most_8_connections_however_many_writers(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    release = asyncio.Event()
    server = await serve(held_until(release))
    client = clients(server.url)
    writes = asyncio.gather(*(write(client, item) for item in ITEMS[:20]))
    await wait_until(lambda: len(server.seen) == 8, changed=server.changed)
    assert server.connections == 8
    release.set()
    await writes
    assert len(server.seen) == 20
    assert server.connections == 8
    assert all(s.by_lane for s in server.seen)


# --------------------------------------------------------------------------- what servers answer


async def test_a_chunked_answer_with_trailers_is_read_and_the_connection_kept(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    async def chunked(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        head = answer(b"", headers=("Transfer-Encoding: chunked",), length=False)
        writer.write(head)
        await writer.drain()
        for part in (ANSWER[:10], ANSWER[10:]):
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\nX-Trailer: yes\r\nX-Other: 2\r\n\r\n")
        return True

    server = await serve(chunked)
    client = clients(server.url)
    answered = await client.update_user_data(USER, ITEMS[0], {"IsFavorite": True})
    assert answered.is_favorite
    await write(client, ITEMS[1])
    assert server.connections == 1
    assert [s.by_lane for s in server.seen] == [True, True]


async def test_a_chunked_answer_without_trailers(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    async def chunked(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        head = answer(b"", headers=("Transfer-Encoding: chunked",), length=False)
        writer.write(head + b"%X\r\n%s\r\n0\r\n\r\n" % (len(ANSWER), ANSWER))
        return True

    server = await serve(chunked)
    client = clients(server.url)
    await write(client)
    await write(client, ITEMS[1])
    assert server.connections == 1
    assert all(s.by_lane for s in server.seen)


@pytest.mark.parametrize(
    "reply",
    [
        answer(headers=("Connection: close",)),
        answer(version="1.0"),
        answer(version="1.0", length=False),
        answer(headers=("Connection: close",), length=False),
    ],
    ids=["connection-close", "http-1.0", "http-1.0-until-close", "close-delimited"],
)
async def test_an_answer_that_closes_is_read_and_the_next_write_connects_again(
    serve: Callable[..., Awaitable[ScriptedServer]],
    clients: Callable[..., JellyfinClient],
    reply: bytes,
) -> None:
    async def closing(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply)
        return False  # the server closes after it

    server = await serve(closing)
    client = clients(server.url)
    answered = await client.update_user_data(USER, ITEMS[0], {"IsFavorite": True})
    assert answered.is_favorite
    await write(client, ITEMS[1])
    assert server.connections == 2
    assert [s.by_lane for s in server.seen] == [True, True]


async def test_100_continue_before_the_answer_is_skipped(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    async def continued(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 102 Processing\r\nX-A: b\r\n\r\n" + answer())
        return True

    server = await serve(continued)
    client = clients(server.url)
    await write(client)
    await write(client, ITEMS[1])
    assert server.connections == 1
    assert all(s.by_lane for s in server.seen)


async def test_an_idle_connection_the_server_closed_is_not_used_again(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    """The server closes each connection after its answer without saying so (its keep-alive
    timeout): the next write lands, each write sent once."""

    async def then_close(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer())
        return False

    server = await serve(then_close)
    client = clients(server.url)
    await write(client)
    await wait_until(lambda: server.closed == 1, changed=server.changed)
    await write(client, ITEMS[1])
    assert [s.target.split("/")[2] for s in server.seen] == ITEMS[:2]
    assert all(s.by_lane for s in server.seen)


async def test_a_write_meeting_the_keep_alive_close_is_sent_once_more_and_lands(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    """The server closes a kept connection as the second write arrives (read, not answered):
    the lane sends it again on a new connection, once."""
    answered = 0

    async def race(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        nonlocal answered
        if seen.conn == 0 and answered == 1:
            return False  # closed without a byte of an answer
        answered += 1
        writer.write(answer())
        return True

    server = await serve(race)
    client = clients(server.url)
    await write(client)
    await write(client, ITEMS[1])
    assert [s.target.split("/")[2] for s in server.seen] == [ITEMS[0], ITEMS[1], ITEMS[1]]
    assert [s.conn for s in server.seen] == [0, 0, 1]
    assert all(s.by_lane for s in server.seen)


async def test_a_408_on_a_kept_connection_is_sent_again(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    async def timeout_once(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.conn == 0 and len(server.seen) == 2:
            writer.write(answer(b"", status="408 Request Timeout", headers=("Connection: close",)))
            return False
        writer.write(answer())
        return True

    server = await serve(timeout_once)
    client = clients(server.url)
    await write(client)
    await write(client, ITEMS[1])
    assert [s.conn for s in server.seen] == [0, 0, 1]


async def test_bytes_sent_to_an_idle_connection_retire_it(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    async def chatty(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer() + b"HTTP/1.1 200 OK\r\n")  # more than the answer
        return True

    server = await serve(chatty)
    client = clients(server.url)
    await write(client)
    await write(client, ITEMS[1])
    assert [s.conn for s in server.seen] == [0, 1]
    assert all(s.by_lane for s in server.seen)


async def test_an_idle_connection_older_than_the_limit_is_closed_not_reused(
    serve: Callable[..., Awaitable[ScriptedServer]], http: aiohttp.ClientSession
) -> None:
    server = await serve()
    now = [100.0]
    client = JellyfinClient("srv", server.url, KEY, session=http, device_id="d")
    assert client._lane is not None
    client._lane._now = lambda: now[0]  # the lane's clock of idle ages
    try:
        await write(client)
        now[0] += 59.0
        await write(client, ITEMS[1])
        now[0] += 61.0
        await write(client, ITEMS[2])
        assert [s.conn for s in server.seen] == [0, 0, 1]
        await wait_until(lambda: server.closed == 1, changed=server.changed)
    finally:
        await client.close()


# --------------------------------------------------------------------------- falling back


@pytest.mark.parametrize("kept", [False, True], ids=["new-connection", "kept-connection"])
async def test_a_reset_in_the_middle_of_an_answer_falls_back_and_lands(
    serve: Callable[..., Awaitable[ScriptedServer]],
    clients: Callable[..., JellyfinClient],
    kept: bool,
) -> None:
    cuts = [1]

    async def cut(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.by_lane and seen.target.split("/")[2] == ITEMS[1] and cuts:
            cuts.pop()
            writer.write(answer()[:40])
            await writer.drain()
            writer.transport.abort()
            return False
        writer.write(answer())
        return True

    server = await serve(cut)
    client = clients(server.url)
    if kept:
        await write(client)  # the connection the cut write then goes on
    await write(client, ITEMS[1])
    tail = server.seen[-2:]
    assert [(s.by_lane, s.target.split("/")[2]) for s in tail] == [
        (True, ITEMS[1]),
        (False, ITEMS[1]),
    ]
    assert tail[0].body == tail[1].body
    # A cut connection is not the server's dialect: the lane stays on.
    await write(client, ITEMS[2])
    assert server.seen[-1].by_lane


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTX/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"x" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 16777217\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000001\r\n{}",
    ],
    ids=[
        "status-line",
        "folded-header",
        "two-lengths",
        "length-and-chunked",
        "gzip-coding",
        "no-length-kept",
        "bad-chunk-size",
        "chunk-without-crlf",
        "101",
        "redirect",
        "head-over-64k",
        "body-over-16m",
        "chunk-over-16m",
    ],
)
async def test_an_answer_the_lane_cannot_read_goes_through_aiohttp(
    serve: Callable[..., Awaitable[ScriptedServer]],
    clients: Callable[..., JellyfinClient],
    garbage: bytes,
) -> None:
    async def odd(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(garbage if seen.by_lane else answer())
        return not seen.by_lane

    server = await serve(odd)
    client = clients(server.url)
    await write(client)
    assert [s.by_lane for s in server.seen] == [True, False]


async def test_garbage_always_is_reported_as_aiohttp_reports_it_and_the_lane_switches_off(
    serve: Callable[..., Awaitable[ScriptedServer]],
    clients: Callable[..., JellyfinClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def garbage(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        return False

    server = await serve(garbage)
    client = clients(server.url)
    errors: list[ServerError] = []
    with caplog.at_level(logging.DEBUG):
        for item in ITEMS[:4]:
            with pytest.raises(ServerError) as caught:
                await write(client, item)
            errors.append(caught.value)
    # What aiohttp made of it, the same as a client without a lane reports.
    aiohttp_only = clients(server.url)
    await aiohttp_only.close()
    with pytest.raises(ServerError) as plain:
        await write(aiohttp_only, ITEMS[0])
    assert {str(e) for e in errors} == {str(plain.value)}
    assert type(errors[0]) is type(plain.value)
    # Three answers it could not read switch the lane off: the fourth write went by aiohttp.
    assert [s.by_lane for s in server.seen][:7] == [True, False] * 3 + [False]
    switched = [r for r in caplog.records if "go through aiohttp from now on" in r.getMessage()]
    assert len(switched) == 1
    assert switched[0].levelno == logging.INFO
    assert "[srv]" in switched[0].getMessage()
    assert KEY not in caplog.text
    for err in [*errors, plain.value]:
        # Nor in any exception it was raised from (aiohttp's repr of an answer it could not
        # read holds the request's headers).
        chained: BaseException | None = err
        while chained is not None:
            assert KEY not in str(chained)
            assert KEY not in repr(chained)
            chained = chained.__cause__ or chained.__context__


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequestError),
        (401, AuthRejectedError),
        (403, AuthRejectedError),
        (404, NotFoundError),
        (429, RateLimitedError),
        (500, ServerSideError),
        (503, ServerSideError),
    ],
)
async def test_error_statuses_map_as_on_the_aiohttp_path(
    make_emulator: MakeEmulator,
    http: aiohttp.ClientSession,
    status: int,
    kind: type[ServerError],
) -> None:
    emu = await make_emulator()
    alice, movie = emu.user_id("alice"), next(i.id for i in emu.leaf_items())
    laned = JellyfinClient("emu", emu.url, API_KEY, session=http, device_id="jfsync-rest")
    plain = JellyfinClient("emu", emu.url, API_KEY, session=http, device_id="jfsync-rest")
    await plain.close()  # its writes go through aiohttp
    failures: list[ServerError] = []
    try:
        for client in (laned, plain):
            emu.fail_next_writes(1, status)
            with pytest.raises(kind) as caught:
                await client.write_user_data(alice, movie, played(), UserData(), PLAY)
            failures.append(caught.value)
        assert str(failures[0]) == str(failures[1])
        assert f"-> HTTP {status}" in str(failures[0])
        secret_free(failures[0], API_KEY)
        # Used up: the write now lands, by the lane, on the connection kept.
        await laned.write_user_data(alice, movie, played(), UserData(), PLAY)
        assert emu.user_data(alice, movie) == played()
    finally:
        await laned.close()


async def test_an_error_body_is_detailed_without_the_key(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    async def refuse(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        body = b'{"title": "Bad key", "detail": "token ' + KEY.encode() + b' is unknown"}'
        writer.write(answer(body, status="401 Unauthorized"))
        return True

    server = await serve(refuse)
    client = clients(server.url)
    with pytest.raises(AuthRejectedError) as caught:
        await write(client)
    assert "Bad key token *** is unknown" in str(caught.value)
    secret_free(caught.value)


async def test_a_200_page_is_not_taken_for_a_write(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    async def page(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"<html>proxy</html>"))
        return True

    server = await serve(page)
    client = clients(server.url)
    with pytest.raises(BadResponseError) as caught:
        await write(client)
    assert "the body is not JSON" in str(caught.value)
    assert server.seen[0].by_lane


async def test_a_hung_server_times_out_within_the_timeout(
    serve: Callable[..., Awaitable[ScriptedServer]],
    clients: Callable[..., JellyfinClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()

    async def hang(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await never.wait()
        return False

    server = await serve(hang)
    client = clients(server.url, timeout_s=0.2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with caplog.at_level(logging.DEBUG), pytest.raises(RequestTimeoutError) as caught:
        await write(client)
    assert loop.time() - start < 5
    assert str(caught.value) == "[srv] POST /UserItems/{itemId}/UserData: no answer within 0.2 s"
    assert [s.by_lane for s in server.seen] == [True]  # not sent again by aiohttp
    secret_free(caught.value)
    assert KEY not in caplog.text


async def test_a_write_hung_after_answered_ones_times_out_at_its_own_deadline(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    """One watch serves a connection's exchanges: the fourth write, hung, times out a whole
    timeout after it was sent, not at the first write's deadline."""
    never = asyncio.Event()

    async def fourth_hangs(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if len(server.seen) == 4:
            await never.wait()
        writer.write(answer())
        return True

    server = await serve(fourth_hangs)
    client = clients(server.url, timeout_s=0.3)
    loop = asyncio.get_running_loop()
    for item in ITEMS[:3]:
        await write(client, item)
    start = loop.time()
    with pytest.raises(RequestTimeoutError):
        await write(client, ITEMS[3])
    assert 0.29 <= loop.time() - start < 5
    assert server.connections == 1


async def test_writes_waiting_for_a_connection_time_out_too(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    """Nine writes to a server that answers none: eight wait on their connections, the ninth
    for a connection; each ends with the timeout error within it, none is sent twice."""
    never = asyncio.Event()

    async def hang(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await never.wait()
        return False

    server = await serve(hang)
    client = clients(server.url, timeout_s=0.3)
    results = await asyncio.gather(
        *(write(client, item) for item in ITEMS[:9]), return_exceptions=True
    )
    assert all(isinstance(r, RequestTimeoutError) for r in results), results
    # The ninth may be handed a turn as the first ones time out, just before its own end.
    assert 8 <= server.connections <= 9
    assert len({s.target for s in server.seen}) == len(server.seen)


async def test_a_waiting_write_cancelled_as_its_turn_is_passed_on(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    """Eight writes in flight, a ninth waiting for a connection; one in flight and the waiting
    one are cancelled together (a stop): the turn passes over the cancelled waiter, and the
    lane then carries eight writes at once again."""
    release = asyncio.Event()
    server = await serve(held_until(release))
    client = clients(server.url)
    tasks = [asyncio.create_task(write(client, item)) for item in ITEMS[:9]]
    await wait_until(lambda: len(server.seen) == 8, changed=server.changed)
    tasks[0].cancel()  # its turn is handed on first...
    tasks[8].cancel()  # ...past the waiter, cancelled in the same turn of the loop
    for task in (tasks[0], tasks[8]):
        with pytest.raises(asyncio.CancelledError):
            await task
    release.set()
    await asyncio.gather(*tasks[1:8])
    await asyncio.gather(*(write(client, item) for item in ITEMS[10:18]))
    assert len(server.seen) == 16
    assert server.connections == 9  # the cancelled write's connection was closed, not reused


async def test_a_refused_connection_is_unreachable_as_on_the_aiohttp_path(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    server = await serve()
    url = server.url
    await server.stop()
    laned, plain = clients(url), clients(url)
    await plain.close()
    failures = []
    for client in (laned, plain):
        with pytest.raises(UnreachableError) as caught:
            await write(client)
        failures.append(caught.value)
    assert str(failures[0]) == str(failures[1])
    assert f"cannot reach {url}" in str(failures[0])
    secret_free(failures[0])


async def test_a_name_that_does_not_resolve_is_unreachable(
    clients: Callable[..., JellyfinClient],
) -> None:
    client = clients("http://jfsync-lane-test.invalid:8096")
    with pytest.raises(UnreachableError) as caught:
        await write(client)
    assert "cannot reach http://jfsync-lane-test.invalid:8096 (" in str(caught.value)
    secret_free(caught.value)


async def test_a_cancelled_write_leaves_the_lane_working(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    release = asyncio.Event()

    async def first_hangs(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if len(server.seen) == 1:
            await release.wait()
            return False
        writer.write(answer())
        return True

    server = await serve(first_hangs)
    client = clients(server.url)
    task = asyncio.create_task(write(client))
    await wait_until(lambda: len(server.seen) == 1, changed=server.changed)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await write(client, ITEMS[1])
    assert [s.conn for s in server.seen] == [0, 1]


# --------------------------------------------------------------------------- TLS, and who gets a lane


def _server_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS_DIR / "localhost-cert.pem", TLS_DIR / "localhost-key.pem")
    return context


async def test_https_with_a_self_signed_certificate_when_verification_is_off(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    server = await serve(tls=_server_tls())
    client = clients(server.url, verify_tls=False)
    for item in ITEMS[:3]:
        await write(client, item)
    assert server.connections == 1
    assert all(s.by_lane for s in server.seen)
    assert server.seen[0].headers["host"] == server.url.removeprefix("https://")
    await client.close()
    await wait_until(lambda: server.closed == 1, changed=server.changed)


async def test_https_refuses_a_self_signed_certificate_as_aiohttp_does(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    server = await serve(tls=_server_tls())
    laned, plain = clients(server.url), clients(server.url)
    await plain.close()
    failures = []
    for client in (laned, plain):
        with pytest.raises(UnreachableError) as caught:
            await write(client)
        failures.append(caught.value)
    assert str(failures[0]) == str(failures[1])
    assert "certificate verify failed" in str(failures[0])
    assert server.seen == []
    secret_free(failures[0])


async def test_a_url_that_needs_encoding_writes_through_aiohttp(
    serve: Callable[..., Awaitable[ScriptedServer]], clients: Callable[..., JellyfinClient]
) -> None:
    server = await serve()
    client = clients(server.url + "/jelly%20fin")
    await write(client)
    assert [(s.by_lane, s.target.split("/")[1]) for s in server.seen] == [(False, "jelly%20fin")]


def test_a_url_with_credentials_gets_no_lane(http: aiohttp.ClientSession) -> None:
    """The lane would have to send them; aiohttp knows what to make of them."""
    client = JellyfinClient(
        "srv", "http://user:pw@127.0.0.1:8096", KEY, session=http, device_id="d"
    )
    assert client._lane is None


def test_the_lane_refuses_headers_that_would_split_a_request() -> None:
    from jfsync.jellyfin.lane import WriteLane

    with pytest.raises(ValueError, match="line break"):
        WriteLane(
            "srv",
            scheme="http",
            host="127.0.0.1",
            port=1,
            base_path="",
            headers={"Authorization": "x\r\nX-Evil: 1"},
            display_url="http://127.0.0.1:1",
            timeout_s=1,
        )
    with pytest.raises(ValueError, match="http and https"):
        WriteLane(
            "srv",
            scheme="ftp",
            host="127.0.0.1",
            port=1,
            base_path="",
            headers={},
            display_url="ftp://127.0.0.1:1",
            timeout_s=1,
        )
    assert KEY not in repr(
        WriteLane(
            "srv",
            scheme="http",
            host="::1",
            port=80,
            base_path="",
            headers={"Authorization": KEY},
            display_url="http://[::1]",
            timeout_s=1,
        )
    )
