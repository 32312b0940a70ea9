"""The write lane: a few kept-alive HTTP/1.1 connections to one server, for the pusher's writes.

A bulk action on one server becomes thousands of ``POST /UserItems/{itemId}/UserData`` (and the
odd ``DELETE``) on every other, and aiohttp's ``session.request`` costs 110-160 us of CPU per
request on this project's machine: as much as all the rest jfsync does for a 10k burst. A
:class:`WriteLane` sends those writes over at most :data:`CONNECTIONS` plain asyncio
connections with the request bytes built from parts made once per client and a small, strict
response reader (about 50 us a request). It is a narrow lane beside aiohttp, not a replacement:
reads, logins and websockets stay on aiohttp, and any answer the lane cannot read with
certainty (a bad status line, a head over 64 KiB, a body with neither a length nor chunks on a
connection that stays open, a redirect, a connection dropped mid-answer) makes the write go
through aiohttp instead (:class:`LaneFallback`), which handles the unusual and reports errors
as it always did. After :data:`STRIKES` answers it could not read, the lane of that server is
switched off for the rest of the run. Timeouts and unreachable servers raise the same errors,
with the same text, as :meth:`jfsync.jellyfin.api.JellyfinClient._exchange`. The request bytes
hold the API key: no exception, log line or repr made here contains them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping

from jfsync import __version__
from jfsync.errors import RequestTimeoutError, UnreachableError

logger = logging.getLogger(__name__)

#: Connections kept to one server: the pusher's concurrency (``jfsync.sync.delivery.CONCURRENCY``).
CONNECTIONS = 8
#: An idle connection older than this is closed instead of reused. Kestrel closes keep-alive
#: connections idle for 130 s; reusing one just before that would often meet the close.
IDLE_S = 60.0
#: Longest head (status line and headers, or a chunked body's trailers) read.
MAX_HEAD = 64 * 1024
#: Longest body read; a write's answer is a few hundred bytes.
MAX_BODY = 16 * 1024 * 1024
#: Longest chunk-size line of a chunked body (the size and its extensions).
MAX_CHUNK_LINE = 1024
#: Answers the lane could not read before it is switched off for the rest of the run.
STRIKES = 3
#: How long :meth:`WriteLane.close` waits for its connections to be gone.
CLOSE_WAIT_S = 1.0

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\r\n]*)?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
#: The headers that say how an answer is framed; the reader looks at no other.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})

# What the reader expects next.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _UNTIL_CLOSE = range(6)


class LaneFallback(Exception):
    """The lane could not carry this write: send it through aiohttp, which reports as usual.

    The message says why, in words (never a byte of the request or the answer).
    """


class _Malformed(Exception):
    """An answer the lane will not read (a protocol error)."""


class _Dropped(Exception):
    """The connection closed before the answer was whole."""

    def __init__(self, answered: bool) -> None:
        super().__init__("answer cut off" if answered else "closed before answering")
        #: Whether any byte of the answer had come.
        self.answered = answered


class _Stale(Exception):
    """A kept connection turned out closed before this request was read: send it again."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection: one request at a time, its answer read as it comes."""

    def __init__(self, lane: WriteLane) -> None:
        self._lane = lane
        self.transport: asyncio.Transport | None = None
        #: Open and fit for another request (a keep-alive answer read whole, nothing extra).
        self.alive = False
        #: When it was last put back idle (the lane's clock).
        self.idle_since = 0.0
        #: It carried a request before (a kept connection the server may have closed since).
        self.kept = False
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        #: The watch on the exchange's deadline, and the deadline it was set for. One watch
        #: serves many exchanges (answers take milliseconds, deadlines are seconds away): it
        #: is moved on to the deadline of the exchange under way when it goes off, instead of
        #: a timer made and cancelled for every request.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._mode = _HEAD
        self._status = 0
        self._length = 0
        self._close_after = False
        self._body = bytearray()
        self._answered = False

    def __repr__(self) -> str:
        return f"<write lane connection alive={self.alive}>"

    # --------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.alive = True

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (a 408 before an idle close, say): not reusable.
            self.abort()
            return
        self._answered = True
        try:
            if not self._buf and self._mode == _HEAD:
                # The usual case: a whole answer in one read, read without a copy.
                end = data.find(b"\r\n\r\n")
                if 0 <= end <= MAX_HEAD:
                    self._read_head(data[:end])
                    if self._mode == _LENGTH:
                        start = end + 4
                        stop = start + self._length
                        if len(data) >= stop:
                            if len(data) > stop:
                                self._buf += data[stop:]
                            self._complete(data[start:stop])
                            return
                    data = data[end + 4 :]
            self._buf += data
            self._advance()
        except _Malformed as err:
            self.abort()
            self._fail(err)

    def eof_received(self) -> None:
        # The server will send no more: not reusable (a close-delimited body ends here; the
        # transport closes itself and connection_lost completes it).
        self.alive = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.gone.done():
            self.gone.set_result(None)
        self._lane._lost(self)
        if self._waiter is None:
            return
        if self._mode == _UNTIL_CLOSE:
            self._body += self._buf
            self._buf.clear()
            if len(self._body) > MAX_BODY:
                self._fail(_Malformed("a body over 16 MiB"))
            else:
                self._complete(bytes(self._body))
            return
        self._fail(_Dropped(self._answered))

    # --------------------------------------------------------------- one exchange

    def exchange(self, request: bytes, deadline: float) -> asyncio.Future[tuple[int, bytes]]:
        """Send ``request``; the future answers (status, body) of its final answer.

        It fails with TimeoutError at ``deadline`` (loop time), :class:`_Malformed` or
        :class:`_Dropped`; the connection is then closed.
        """
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._waiter = waiter
        self._mode = _HEAD
        self._answered = False
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._watch)
            self._timer_at = deadline
        self.transport.write(request)
        return waiter

    def abort(self) -> None:
        """Close at once, whatever is under way (nothing of it will be read)."""
        self.alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _watch(self) -> None:
        """The watch went off: time the exchange under way out, or watch its deadline."""
        self._timer = None
        if self._waiter is None:
            return  # idle: the next exchange sets a watch
        if self._deadline > self._timer_at:
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._watch)
            self._timer_at = self._deadline
            return
        self.abort()
        self._fail(TimeoutError())

    def _complete(self, body: bytes) -> None:
        if self._close_after or self._buf:
            # The server closes after this answer, or sent more than it: not reused.
            self.abort()
        self._finish()
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, body))

    def _fail(self, err: BaseException) -> None:
        self._finish()
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)

    def _finish(self) -> None:
        if self._body:
            self._body = bytearray()

    # --------------------------------------------------------------- the reader

    def _advance(self) -> None:
        """Read what the buffer holds of the answer; complete it once it is whole."""
        buf = self._buf
        while True:
            mode = self._mode
            if mode == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0 or end > MAX_HEAD:
                    if len(buf) > MAX_HEAD + 3:
                        raise _Malformed("a head over 64 KiB")
                    return
                self._read_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif mode == _LENGTH:
                length = self._length
                if len(buf) < length:
                    return
                body = bytes(buf[:length])
                del buf[:length]
                self._complete(body)
                return
            elif mode == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0 or end > MAX_CHUNK_LINE:
                    if len(buf) > MAX_CHUNK_LINE + 1:
                        raise _Malformed("a chunk-size line over 1 KiB")
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                if _HEX.fullmatch(size_text) is None:
                    raise _Malformed("a bad chunk size")
                size = int(size_text, 16)
                if size == 0:
                    self._mode = _TRAILERS
                elif len(self._body) + size > MAX_BODY:
                    raise _Malformed("a body over 16 MiB")
                else:
                    self._length = size
                    self._mode = _CHUNK_DATA
            elif mode == _CHUNK_DATA:
                length = self._length
                if len(buf) < length + 2:
                    return
                if buf[length : length + 2] != b"\r\n":
                    raise _Malformed("a chunk not ended by CRLF")
                self._body += buf[:length]
                del buf[: length + 2]
                self._mode = _CHUNK_SIZE
            elif mode == _TRAILERS:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    self._complete(bytes(self._body))
                    return
                end = buf.find(b"\r\n\r\n")
                if end < 0 or end > MAX_HEAD:
                    if len(buf) > MAX_HEAD + 3:
                        raise _Malformed("trailers over 64 KiB")
                    return
                del buf[: end + 4]  # trailers are read past, not used
                self._complete(bytes(self._body))
                return
            else:  # _UNTIL_CLOSE: the body ends when the server closes
                self._body += buf
                buf.clear()
                if len(self._body) > MAX_BODY:
                    raise _Malformed("a body over 16 MiB")
                return

    def _read_head(self, head: bytes) -> None:
        """Read a status line and headers; set how the body is delimited."""
        lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise _Malformed("not an HTTP/1.x status line")
        status = int(match.group(2))
        close = match.group(1) == b"0"  # HTTP/1.0: closed after the answer
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1] in b" \t" or line[0] in b" \t":
                raise _Malformed("a bad header line")
            key = name.lower()
            if key not in _FRAMING:
                continue
            if key == b"content-length":
                text = value.strip()
                if not text.isdigit() or (length is not None and int(text) != length):
                    raise _Malformed("a bad Content-Length")
                length = int(text)
            elif key == b"transfer-encoding":
                if chunked or value.strip().lower() != b"chunked":
                    raise _Malformed("a transfer coding other than chunked")
                chunked = True
            elif key == b"connection":
                close = close or b"close" in {t.strip().lower() for t in value.split(b",")}
        if status < 200:
            if status == 101:
                raise _Malformed("101 Switching Protocols")
            return  # an interim answer (100 Continue): the real one follows
        self._status = status
        self._close_after = close
        if chunked:
            if length is not None:
                raise _Malformed("both Content-Length and chunked")
            self._mode = _CHUNK_SIZE
        elif length is not None or status in (204, 304):
            length = length or 0
            if length > MAX_BODY:
                raise _Malformed("a body over 16 MiB")
            self._length = length
            self._mode = _LENGTH
        elif close:
            self._mode = _UNTIL_CLOSE
        else:
            raise _Malformed("a body with neither a length nor chunks on a kept connection")


class WriteLane:
    """At most ``connections`` kept-alive connections to one server, for its writes.

    ``headers`` are the client's own (Authorization and Accept), sent with every request;
    ``base_path`` is the server URL's path (a reverse proxy's prefix), put before each
    request's path. ``now`` is the clock of idle ages (monotonic seconds; tests inject one).
    """

    def __init__(
        self,
        server: str,
        *,
        scheme: str,
        host: str,
        port: int | None,
        base_path: str,
        headers: Mapping[str, str],
        display_url: str,
        timeout_s: float,
        verify_tls: bool = True,
        connections: int = CONNECTIONS,
        idle_s: float = IDLE_S,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"the write lane speaks http and https, not {scheme}")
        for name, value in headers.items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise ValueError("a header with a line break cannot be sent by the write lane")
        self.server = server
        self._https = scheme == "https"
        self._host = host
        self._port = port or (443 if self._https else 80)
        self._base_path = base_path.rstrip("/")
        self._display_url = display_url
        self._timeout_s = timeout_s
        self._verify_tls = verify_tls
        self._ssl: ssl.SSLContext | None = None
        self._idle_s = idle_s
        self._now = now
        named = f"[{host}]" if ":" in host else host
        default = 443 if self._https else 80
        host_header = named if self._port == default else f"{named}:{self._port}"
        fixed = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        common = f"Host: {host_header}\r\n{fixed}User-Agent: jfsync/{__version__}\r\n"
        self._head_tail = f" HTTP/1.1\r\n{common}\r\n".encode("latin-1")
        self._json_tail = (
            f" HTTP/1.1\r\n{common}Content-Type: application/json\r\nContent-Length: "
        ).encode("latin-1")
        #: Requests under way may number ``connections``; the others wait here, in turn.
        self._free = connections
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Idle connections, the last put back on top (reused first).
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._strikes = 0
        self._enabled = True
        self._closed = False

    def __repr__(self) -> str:
        return f"WriteLane(server={self.server!r}, url={self._display_url!r})"

    @property
    def usable(self) -> bool:
        """Whether writes go through the lane: not closed, not switched off."""
        return self._enabled and not self._closed

    @property
    def connections(self) -> int:
        """Connections open now (idle or in use)."""
        return len(self._open)

    async def send(
        self, method: str, route: str, path: str, body: bytes | None
    ) -> tuple[int, bytes]:
        """Send one write to ``path`` (the route with its ids, and the query); answer the
        final answer's status and body, whatever the status.

        Raises :class:`RequestTimeoutError` when there is no whole answer within the timeout
        (connecting, waiting for a connection and the answer included),
        :class:`UnreachableError` when no connection can be made, and :class:`LaneFallback`
        when the write must go through aiohttp instead. ``route`` (the template) names the
        request in errors.
        """
        target = f"{self._base_path}{path}"
        if body is None:
            request = f"{method} {target}".encode("latin-1") + self._head_tail
        else:
            request = (
                f"{method} {target}".encode("latin-1")
                + self._json_tail
                + b"%d\r\n\r\n" % len(body)
                + body
            )
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            await self._wait_turn(method, route, deadline)
        try:
            conn = self._take_idle()
            if conn is None:
                return await self._on_new(method, route, request, deadline)
            try:
                return await self._exchange(conn, method, route, request, deadline)
            except _Dropped as err:
                if err.answered:
                    raise LaneFallback("the connection closed in the middle of an answer") from None
            except _Stale:
                pass
            # The server closed this kept connection as the request went (the keep-alive
            # race: nothing of an answer came). A user-data write sets values, so sending it
            # once more, on a new connection, cannot do anything twice.
            return await self._on_new(method, route, request, deadline)
        finally:
            self._done_turn()

    async def close(self) -> None:
        """Close every connection and wait until they are gone; the lane is unusable after."""
        self._closed = True
        self._idle.clear()
        conns = list(self._open)
        for conn in conns:
            conn.abort()
        if conns:
            await asyncio.wait([conn.gone for conn in conns], timeout=CLOSE_WAIT_S)

    # --------------------------------------------------------------- pool

    async def _wait_turn(self, method: str, route: str, deadline: float) -> None:
        """Wait until a request under way is answered (every connection is in use); the
        wait counts in the request's timeout."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            async with asyncio.timeout_at(deadline):
                await turn
        except BaseException as err:
            if turn.done() and not turn.cancelled():
                self._done_turn()  # handed over as this wait ended: pass it on
            elif turn in self._waiting:  # (a turn handed on meanwhile skipped it)
                self._waiting.remove(turn)
            if isinstance(err, TimeoutError):
                raise self._timeout(method, route) from err
            raise

    def _done_turn(self) -> None:
        """A request is through: hand its turn to the first one waiting, or free it."""
        waiting = self._waiting
        while waiting:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        now = self._now()
        while idle:
            conn = idle.pop()
            if conn.alive and now - conn.idle_since < self._idle_s:
                return conn
            conn.abort()
        return None

    def _put_back(self, conn: _Connection) -> None:
        if not conn.alive or self._closed:
            conn.abort()
            return
        now = self._now()
        conn.idle_since = now
        conn.kept = True
        idle = self._idle
        idle.append(conn)
        if now - idle[0].idle_since >= self._idle_s:
            idle.pop(0).abort()  # the one idle longest, too old to be reused

    def _lost(self, conn: _Connection) -> None:
        """A connection is closed (by either side): it leaves the pool."""
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def _on_new(
        self, method: str, route: str, request: bytes, deadline: float
    ) -> tuple[int, bytes]:
        """Send ``request`` on a new connection."""
        conn = await self._connect(method, route, deadline)
        try:
            return await self._exchange(conn, method, route, request, deadline)
        except (_Dropped, _Stale) as err:
            # Not the keep-alive race: a server that accepts and closes. aiohttp tries it and
            # reports what it finds.
            raise LaneFallback(f"a new connection {err}") from None

    async def _connect(self, method: str, route: str, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        context = self._ssl_context()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=context,
                    server_hostname=self._host if context is not None else None,
                )
        except TimeoutError as err:
            raise self._timeout(method, route) from err
        except OSError as err:  # refused, reset, name not found, TLS refused
            reason = err.strerror or type(err).__name__
            raise UnreachableError(
                self.server, f"{method} {route}: cannot reach {self._display_url} ({reason})"
            ) from err
        self._open.add(conn)
        if self._closed:
            conn.abort()
            raise LaneFallback("the lane was closed")
        return conn

    async def _exchange(
        self, conn: _Connection, method: str, route: str, request: bytes, deadline: float
    ) -> tuple[int, bytes]:
        try:
            status, raw = await conn.exchange(request, deadline)
        except TimeoutError as err:
            raise self._timeout(method, route) from err
        except _Malformed as err:
            self._strike(str(err))
            raise LaneFallback(f"an answer it cannot read: {err}") from None
        except BaseException:
            conn.abort()  # cancelled half way (a stop): its answer would be read by no one
            raise
        if status == 408 and conn.kept:
            # Some servers answer 408 as they close an idle connection: this request was
            # never read. Sent again on a new connection (see send).
            conn.abort()
            raise _Stale
        if 300 <= status < 400:
            self._put_back(conn)
            self._strike(f"HTTP {status} (a redirect)")
            raise LaneFallback(f"the server answered HTTP {status}")
        self._put_back(conn)
        return status, raw

    def _strike(self, reason: str) -> None:
        self._strikes += 1
        logger.debug("[%s] write lane: %s", self.server, reason)
        if self._strikes >= STRIKES and self._enabled:
            self._enabled = False
            logger.info(
                "[%s] writes go through aiohttp from now on: %d answers of %s could not be "
                "read by the write lane (the last: %s)",
                self.server,
                self._strikes,
                self._display_url,
                reason,
            )
            for conn in self._idle:
                conn.abort()
            self._idle.clear()

    def _timeout(self, method: str, route: str) -> RequestTimeoutError:
        return RequestTimeoutError(
            self.server, f"{method} {route}: no answer within {self._timeout_s:g} s"
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings of every connection (https only), made at the first."""
        if not self._https:
            return None
        if self._ssl is None:
            context = ssl.create_default_context()
            if not self._verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl
