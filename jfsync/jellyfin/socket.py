"""One websocket connection to a Jellyfin server as one user: open, keep alive, read, close.

:class:`JellyfinSocket` is transport only; the reconnect policy lives in
:mod:`jfsync.sync.subscriber`. It opens ``ws(s)://host[/base]/socket`` with an
``Authorization: MediaBrowser ... Token="..."`` header (fact sheet §1.2), reads frames in its
own task so keepalives are answered even while the consumer is busy, and hands the messages
jfsync acts on (UserDataChanged, LibraryChanged, Sessions, ServerRestarting,
ServerShuttingDown) to the consumer in order through :meth:`JellyfinSocket.receive`;
:meth:`JellyfinSocket.send` sends a subscription such as ``SessionsStart``.

KeepAlive (§1.4): a ``ForceKeepAlive`` is answered at once, and a ``KeepAlive`` is sent every
``keepalive_interval_s`` (30 s, as Jellyfin's own clients do). When no reply arrives within
``keepalive_timeout_s`` of a KeepAlive, the socket is declared dead: that is the only way to
see a half-open connection, since Jellyfin never closes a lost socket before v12. websockets'
own pings are off so every timer goes through the injected :class:`~jfsync.timing.Clock`.

Errors: a 401/403 on the upgrade raises :class:`~jfsync.errors.AuthRejectedError`, other
statuses the matching :class:`~jfsync.errors.HttpStatusError`, a refused or broken handshake
:class:`~jfsync.errors.UnreachableError`, no answer in time
:class:`~jfsync.errors.RequestTimeoutError`; a connection that ends raises
:class:`SocketClosedError` (or :class:`KeepAliveTimeoutError`) from the message iterator,
also when the reader itself fails unexpectedly (the reason names the error). Malformed frames
are logged and skipped (the first few in full, then a count once a minute:
:class:`~jfsync.ratelimit.RepeatLimiter`); unknown message types are logged at DEBUG and
ignored. No log line, repr or error carries the token.

Limits against a misbehaving server: a message larger than ``max_message_bytes`` closes the
connection (the reconnect's catch-up scan reads what it said); frames of
:data:`STEPPED_PARSE_BYTES` or more are parsed in steps that give the event loop back between
them (:func:`~jfsync.jellyfin.messages.parse_message_decoded_steps` below
:data:`WHOLE_DECODE_BYTES`, :func:`~jfsync.jellyfin.messages.parse_message_steps` above); at most
:data:`MAX_QUEUED_MESSAGES` messages, or ``2 * max_message_bytes`` of them, wait for the
consumer: past that the socket is declared fallen behind and closed, and the reconnect's scan
catches up; the KeepAlive bookkeeping keeps the last :data:`KEEPALIVES_KEPT` sends.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections.abc import Awaitable
from typing import Final, TypeVar, cast
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode

from jfsync import __version__
from jfsync.errors import (
    RequestTimeoutError,
    TransportError,
    UnreachableError,
    error_for_status,
)
from jfsync.jellyfin.messages import (
    KEEPALIVE_FRAME,
    MAX_MESSAGE_BYTES,
    ForceKeepAliveMessage,
    KeepAliveMessage,
    LibraryChangedMessage,
    MalformedMessageError,
    Message,
    ServerRestartingMessage,
    ServerShuttingDownMessage,
    SessionsMessage,
    UnknownMessage,
    UserDataChangedMessage,
    parse_message,
    parse_message_decoded_steps,
    parse_message_steps,
)
from jfsync.ratelimit import RepeatLimiter
from jfsync.timing import Clock

logger = logging.getLogger(__name__)

#: Jellyfin's clients send KeepAlive every half of the server's 60 s lost timeout (§1.4).
KEEPALIVE_INTERVAL_S: Final = 30.0
#: A KeepAlive reply on a live loopback or LAN link takes milliseconds; 20 s means dead.
KEEPALIVE_TIMEOUT_S: Final = 20.0
#: How long the TCP connect plus HTTP upgrade may take.
OPEN_TIMEOUT_S: Final = 10.0
#: Real-time bound for websockets' closing handshake; only reached against a dead peer.
CLOSE_TIMEOUT_S: Final = 2.0
#: The route logged and put in errors; never the URL, which could be given with credentials.
SOCKET_ROUTE: Final = "/socket"
#: Frames this large or larger are parsed in steps, giving the event loop back between them.
STEPPED_PARSE_BYTES: Final = 256 * 1024
#: Frames smaller than this are decoded from JSON at once (C speed, about 7 ms a MiB) and only
#: validated in steps; larger ones are walked value by value too. The decode is one step that
#: allocates every entry at once: for a 10,000-entry frame (1.4 MB) 10-13 ms alone, and 21-38
#: ms of the event loop inside ``jfsync run`` beside a 100,000-item server (the collector's
#: and the kernel's share of those allocations come within it), which a loaded machine
#: stretched past 50 ms. Walked, the same frame takes 56-60 ms of CPU instead of 38-42, in
#: steps of 2-4 ms.
WHOLE_DECODE_BYTES: Final = 512 * 1024
#: Messages waiting for the consumer before the socket counts as fallen behind. Jellyfin sends
#: at most two UserDataChanged a second (its 500 ms debounce), so this is minutes of backlog.
MAX_QUEUED_MESSAGES: Final = 1000
#: KeepAlive send times kept for tests and status (one is sent every 30 s).
KEEPALIVES_KEPT: Final = 64

#: What the consumer receives: the messages the subscriber acts on.
LiveMessage = (
    UserDataChangedMessage
    | LibraryChangedMessage
    | ServerRestartingMessage
    | ServerShuttingDownMessage
    | SessionsMessage
)

_T = TypeVar("_T")


class SocketClosedError(TransportError):
    """The websocket connection ended (closed by the server, reset, or found dead)."""


class KeepAliveTimeoutError(SocketClosedError):
    """No KeepAlive reply arrived in time: the connection is half-open or the server is stuck."""


def socket_url(url: str) -> str:
    """Turn a server's base URL (``http(s)://host[:port][/base]``) into its websocket URL."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + SOCKET_ROUTE, "", ""))


def authorization_header(device_id: str, token: str, *, device: str = "jfsync") -> str:
    """Build the ``Authorization: MediaBrowser`` value; Jellyfin URL-decodes each value."""
    fields = {
        "Client": "jfsync",
        "Device": device,
        "DeviceId": device_id,
        "Version": __version__,
        "Token": token,
    }
    return "MediaBrowser " + ", ".join(f'{k}="{quote(v, safe="")}"' for k, v in fields.items())


class JellyfinSocket:
    """One websocket connection to ``server`` as one user; no retries, typed errors."""

    def __init__(
        self,
        server: str,
        url: str,
        *,
        user: str,
        device_id: str,
        token: str,
        clock: Clock,
        keepalive_interval_s: float = KEEPALIVE_INTERVAL_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        open_timeout_s: float = OPEN_TIMEOUT_S,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        bad_frames: RepeatLimiter | None = None,
    ) -> None:
        self.server = server
        self.user = user
        self.device_id = device_id
        self._url = socket_url(url)
        self._token = token
        self._clock = clock
        self._keepalive_interval_s = keepalive_interval_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._open_timeout_s = open_timeout_s
        self._max_message_bytes = max_message_bytes
        self._max_queued_messages = max_queued_messages
        self._max_queued_bytes = 2 * max_message_bytes
        #: Logs malformed frames: pass one to keep counting across reconnects.
        self.bad_frames = bad_frames or RepeatLimiter(
            logger, clock, f"[{server}/{user}] malformed websocket frames"
        )
        self._ws: ClientConnection | None = None
        #: Messages for the consumer with the size of the frame each came in (None: the end).
        self._queue: asyncio.Queue[tuple[LiveMessage | None, int]] = asyncio.Queue()
        self._queued_bytes = 0
        self._error: SocketClosedError | None = None
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # the keepalive schedule changed
        self._force_pending = False  # a ForceKeepAlive waits for its answer
        self._unanswered_since: float | None = None
        #: Monotonic times at which KeepAlives were sent (tests and status read it).
        self.keepalives_sent: list[float] = []
        #: Count of KeepAlive replies received.
        self.keepalive_replies = 0

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<JellyfinSocket {self.server}/{self.user} {state}>"

    @property
    def is_open(self) -> bool:
        """Tell whether the connection is up and not closing."""
        return self._ws is not None and self._error is None and not self._closing

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by the consumer."""
        return self._queue.qsize()

    async def connect(self) -> None:
        """Open the connection and start reading and keeping it alive."""
        assert self._ws is None, "connect() is called once per JellyfinSocket"
        opening = connect(
            self._url,
            additional_headers={"Authorization": authorization_header(self.device_id, self._token)},
            user_agent_header=f"jfsync/{__version__}",
            proxy=None,
            open_timeout=None,
            ping_interval=None,
            ping_timeout=None,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=self._max_message_bytes,
            # Jellyfin (ASP.NET Core, compression not enabled) never deflates its messages;
            # offering it would only let a peer make jfsync inflate a whole large message in
            # one call.
            compression=None,
        )
        try:
            self._ws = await _within(self._clock, self._open_timeout_s, opening)
        except TimeoutError:
            raise RequestTimeoutError(
                self.server, f"websocket {SOCKET_ROUTE}: no answer within {self._open_timeout_s} s"
            ) from None
        except InvalidStatus as err:
            status = err.response.status_code
            raise error_for_status(
                self.server, "GET", SOCKET_ROUTE, status, "websocket upgrade refused"
            ) from None
        except (OSError, InvalidHandshake, EOFError) as err:
            raise UnreachableError(
                self.server, f"websocket {SOCKET_ROUTE}: {_reason(err)}"
            ) from None
        label = f"{self.server}/{self.user}"
        self._reader = asyncio.create_task(self._read_loop(), name=f"jfsync-ws-read[{label}]")
        self._keeper = asyncio.create_task(
            self._keepalive_loop(), name=f"jfsync-ws-keepalive[{label}]"
        )

    async def send(self, frame: str) -> None:
        """Send one text frame (a subscription such as ``SessionsStart``).

        Raises SocketClosedError when the connection is not open or closes meanwhile.
        """
        ws = self._ws
        if ws is None or not self.is_open:
            raise self._error or SocketClosedError(self.server, "websocket is not open")
        try:
            await ws.send(frame)
        except ConnectionClosed as err:
            raise SocketClosedError(self.server, f"websocket closed: {_reason(err)}") from None

    async def receive(self) -> LiveMessage | None:
        """Return the next live message in arrival order, or None once :meth:`close` was called.

        Raises SocketClosedError (or KeepAliveTimeoutError) when the connection ended by
        itself; messages received before the end are returned first.
        """
        message, size = await self._queue.get()
        self._queued_bytes -= size
        if message is None:
            self._queue.put_nowait((None, 0))  # stay at the end for later callers
            if self._error is not None and not self._closing:
                raise self._error
        return message

    def __aiter__(self) -> JellyfinSocket:
        """Iterate over live messages (see :meth:`receive`)."""
        return self

    async def __anext__(self) -> LiveMessage:
        """Return the next live message; stop when closed by us."""
        message = await self.receive()
        if message is None:
            raise StopAsyncIteration
        return message

    async def close(self) -> None:
        """Close the connection and wait for the reader and keepalive tasks to end."""
        self._closing = True
        ws = self._ws
        tasks = [t for t in (self._keeper, self._reader) if t is not None]
        for task in tasks:
            task.cancel()
        if ws is not None:
            if self._error is not None:
                ws.transport.abort()
            else:
                with contextlib.suppress(Exception):
                    await ws.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                logger.debug("[%s/%s] socket task ended with %r", self.server, self.user, result)
        self._queue.put_nowait((None, 0))
        self.bad_frames.flush()
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise asyncio.CancelledError

    # ------------------------------------------------------------------ internals

    async def _read_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            while True:
                # Undecoded: a large frame is decoded in steps too (_parse).
                frame = await ws.recv(decode=False)
                message = await self._parse(frame)
                if message is not None and not self._handle_message(message, len(frame)):
                    return
                del frame, message
        except ConnectionClosed as err:
            if err.sent is not None and err.sent.code == CloseCode.MESSAGE_TOO_BIG:
                reason = (
                    f"the server sent a message larger than {_mib(self._max_message_bytes)}; "
                    "if the library is that large, raise servers[].max_message_size"
                )
            else:
                reason = f"websocket closed: {_reason(err)}"
            self._fail(SocketClosedError(self.server, reason))
        except OSError as err:
            self._fail(SocketClosedError(self.server, f"websocket broken: {_reason(err)}"))
        except Exception as err:
            # A frame the parser chokes on (a JSON nesting too deep for it, a bug): end the
            # connection with the reason, so the consumer reconnects instead of waiting on a
            # socket that nothing reads any more.
            # The consumer logs the reason; the traceback is for debugging.
            logger.debug(
                "[%s/%s] the websocket reader failed", self.server, self.user, exc_info=err
            )
            self._fail(
                SocketClosedError(
                    self.server, f"websocket reader failed: {type(err).__name__}: {err}"
                )
            )
        finally:
            # A dead peer is not worth a closing handshake; make sure the transport is gone.
            if self._error is not None:
                ws.transport.abort()
            self._queue.put_nowait((None, 0))
            if self._keeper is not None and self._keeper is not asyncio.current_task():
                self._keeper.cancel()

    async def _parse(self, frame: str | bytes) -> Message | None:
        """Parse a frame (a large one in steps, yielding to the loop); None when malformed."""
        try:
            if len(frame) < STEPPED_PARSE_BYTES:
                return parse_message(frame)
            if len(frame) < WHOLE_DECODE_BYTES:
                steps = parse_message_decoded_steps(frame)
            else:
                if isinstance(frame, bytes):
                    frame = await _decode_in_steps(frame)
                steps = parse_message_steps(frame)
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    return cast(Message, done.value)
                await asyncio.sleep(0)
        except MalformedMessageError as err:
            self.bad_frames.log(
                "[%s/%s] skipped a websocket frame: %s", self.server, self.user, err
            )
            return None

    def _handle_message(self, message: Message, size: int) -> bool:
        """Act on a keepalive or queue a live message; False when the consumer fell behind."""
        if isinstance(message, KeepAliveMessage):
            self.keepalive_replies += 1
            self._unanswered_since = None
            self._wake.set()
        elif isinstance(message, ForceKeepAliveMessage):
            logger.debug(
                "[%s/%s] ForceKeepAlive (%s s); answering",
                self.server,
                self.user,
                message.timeout_s,
            )
            self._force_pending = True
            self._wake.set()
        elif isinstance(message, UnknownMessage):
            logger.debug(
                "[%s/%s] ignored a %s message", self.server, self.user, message.message_type
            )
        else:
            if (
                self._queue.qsize() >= self._max_queued_messages
                or self._queued_bytes + size > self._max_queued_bytes
            ):
                self._fail(
                    SocketClosedError(
                        self.server,
                        f"fell behind: {self._queue.qsize()} messages "
                        f"({_mib(self._queued_bytes)}) wait to be applied; reconnecting, the "
                        "catch-up scan reads what the rest said",
                    )
                )
                return False
            self._queued_bytes += size
            self._queue.put_nowait((message, size))
        return True

    async def _keepalive_loop(self) -> None:
        next_send = self._clock.monotonic() + self._keepalive_interval_s
        while True:
            wake = next_send
            if self._unanswered_since is not None:
                wake = min(wake, self._unanswered_since + self._keepalive_timeout_s)
            await self._sleep_or_wake(wake - self._clock.monotonic())
            now = self._clock.monotonic()
            if (
                self._unanswered_since is not None
                and now >= self._unanswered_since + self._keepalive_timeout_s
            ):
                self._fail(
                    KeepAliveTimeoutError(
                        self.server,
                        f"no KeepAlive reply within {self._keepalive_timeout_s:g} s; "
                        "connection is dead",
                    )
                )
                assert self._ws is not None
                self._ws.transport.abort()
                return
            if self._force_pending or now >= next_send:
                self._force_pending = False
                await self._send_keepalive(now)
                next_send = now + self._keepalive_interval_s

    async def _send_keepalive(self, now: float) -> None:
        assert self._ws is not None
        self.keepalives_sent.append(now)
        if len(self.keepalives_sent) > KEEPALIVES_KEPT:
            del self.keepalives_sent[: -KEEPALIVES_KEPT // 2]
        if self._unanswered_since is None:
            self._unanswered_since = now
        try:
            await self._ws.send(KEEPALIVE_FRAME)
        except ConnectionClosed:
            # The reader sees the same close and reports it.
            return

    async def _sleep_or_wake(self, seconds: float) -> None:
        """Sleep on the clock, or less when a reply or a ForceKeepAlive changes the schedule."""
        if self._wake.is_set():
            self._wake.clear()
            return
        sleeper = asyncio.create_task(
            self._clock.sleep(seconds), name=f"jfsync-ws-keepalive-sleep[{self.server}]"
        )
        waker = asyncio.create_task(self._wake.wait(), name=f"jfsync-ws-wake[{self.server}]")
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
        self._wake.clear()

    def _fail(self, error: SocketClosedError) -> None:
        if self._error is None and not self._closing:
            self._error = error


async def _within(clock: Clock, seconds: float, awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` but raise TimeoutError once ``seconds`` pass on ``clock``."""
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.create_task(clock.sleep(seconds), name="jfsync-ws-open-timeout")
    try:
        await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(timer, work, return_exceptions=True)
    if work.cancelled():
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise asyncio.CancelledError
        raise TimeoutError
    return work.result()


#: Bytes of a large frame decoded from UTF-8 between two pauses.
DECODE_STEP_BYTES: Final = 1024 * 1024


async def _decode_in_steps(frame: bytes) -> str:
    """Decode UTF-8 a megabyte at a time, giving the loop back between; bad bytes raise."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    view = memoryview(frame)
    try:
        for start in range(0, len(frame), DECODE_STEP_BYTES):
            end = start + DECODE_STEP_BYTES
            parts.append(decoder.decode(view[start:end], final=end >= len(frame)))
            await asyncio.sleep(0)
    except UnicodeDecodeError:
        raise MalformedMessageError("binary frame that is not UTF-8 text") from None
    finally:
        view.release()
    return "".join(parts)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def _reason(err: BaseException) -> str:
    """Describe a transport error without URLs or headers (they could carry credentials)."""
    if isinstance(err, ConnectionClosed):
        if err.rcvd is not None:
            text = f"code {err.rcvd.code}"
            return text + (f" ({err.rcvd.reason})" if err.rcvd.reason else "")
        return "connection lost without a close frame"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return type(err).__name__
