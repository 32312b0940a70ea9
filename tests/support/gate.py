"""A loopback TCP proxy in front of an emulator that can hold its frames or stand in for it.

Used by the cluster fixture (``gated=``) and by tests that need an event to arrive late, or a
reverse proxy's answer while the server behind it is down.
"""

from __future__ import annotations

import asyncio

from tests.support.waiting import WAIT_S, wait_until


class SocketGate:
    """A loopback TCP proxy in front of an emulator that can hold its websocket frames.

    Plain HTTP passes straight through. On connections that ask for a websocket upgrade,
    bytes from the server to jfsync go through a gate: while it is held they queue in order,
    and :meth:`release` delivers them. That reproduces an event that is flushed by the server
    at one moment and reaches jfsync later, after jfsync wrote again. :meth:`hold_http` does
    the same to HTTP answers (an answer built before a user's action, read after its event).

    While the server behind it refuses connections (stopped) and :attr:`down_answer` is set,
    the gate answers every request itself with that status and body, as a reverse proxy in
    front of a stopped server does (502 from nginx, 404 from traefik once the container is
    gone, or a maintenance page); otherwise it closes the connection.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        #: (status, body) answered while the server behind refuses connections.
        self.down_answer: tuple[int, str] | None = None
        #: The request lines answered with ``down_answer`` (e.g. ``GET /System/Info/Public``).
        self.down_answered: list[str] = []
        self._answered = asyncio.Event()
        self._open = asyncio.Event()
        self._open.set()
        self._http_open = asyncio.Event()
        self._http_open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and cut every proxied connection."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def hold(self) -> None:
        """Queue websocket frames to jfsync from now on."""
        self._open.clear()

    def release(self) -> None:
        """Deliver the queued frames, in order, and stop holding."""
        self._open.set()

    def hold_http(self) -> None:
        """Queue HTTP answers to jfsync from now on (websocket frames are not affected)."""
        self._http_open.clear()

    def release_http(self) -> None:
        """Deliver the queued HTTP answers, in order, and stop holding them."""
        self._http_open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            if self.down_answer is not None:
                await self._answer_down(reader, writer, *self.down_answer)
            writer.close()
            return
        self._writers.append(up_writer)
        first = await reader.read(65536)
        gated = b"upgrade: websocket" in first.lower()
        up_writer.write(first)
        n = len(self._tasks)
        for coro, name in (
            (self._pump(reader, up_writer, gated=False), f"gate-up-{n}"),
            (self._pump(up_reader, writer, gated=gated, http=not gated), f"gate-down-{n}"),
        ):
            task = asyncio.get_running_loop().create_task(coro, name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def wait_down_answered(self, path: str, count: int, timeout_s: float = WAIT_S) -> None:
        """Wait until ``count`` requests for ``path`` were answered with ``down_answer``."""
        await wait_until(
            lambda: sum(line.split(" ")[1:2] == [path] for line in self.down_answered) >= count,
            timeout_s,
            changed=self._answered,
        )

    async def _answer_down(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, body: str
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        payload = body.encode()
        reason = {200: "OK", 404: "Not Found", 502: "Bad Gateway"}.get(status, "Status")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        try:
            await writer.drain()
        except ConnectionError:
            return
        # Only the request line: method and path (the query could carry anything).
        method, _, rest = line.partition(" ")
        self.down_answered.append(f"{method} {rest.split(' ')[0].split('?')[0]}")
        self._answered.set()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        gated: bool,
        http: bool = False,
    ) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if gated:
                    await self._open.wait()
                if http:
                    await self._http_open.wait()
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
