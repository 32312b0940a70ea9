"""The live subscription of one (server, user): reconnect policy, resync hook and typed events.

A :class:`Subscriber` keeps one :class:`~jfsync.jellyfin.socket.JellyfinSocket` open for one
user of one server and turns its messages into :data:`SubscriberEvent` values handed to
``on_event`` one at a time, in arrival order. Reconnecting is an explicit state machine
(:class:`SubscriberState`)::

    IDLE ─start()─▶ CONNECTING ─socket open─▶ RESYNCING ─resync() done─▶ CONNECTED
                      │   ▲                       │ (events buffered)        │
      transport error │   │ delay passed          │ resync failed            │ socket lost
                      ▼   │                       ▼                          ▼
                    BACKOFF ◀──────────────────────────────────────────────────┘
    CONNECTING ─token refused twice─▶ AUTH_FAILED ─slow retry─▶ CONNECTING
    CONNECTED ─ServerRestarting/ServerShuttingDown─▶ COOLDOWN ─cooldown─▶ CONNECTING
    any ─stop()─▶ STOPPED

* Backoff delays come from an injected factory (:func:`jfsync.timing.backoff_delays`: capped
  exponential with jitter); a fresh sequence starts after a connection stayed healthy for
  ``healthy_after_s`` and after a cooldown.
* A refused token (HTTP 401/403 on the upgrade) is re-minted once with ``get_token(True)``;
  if the new one is refused too, the subscriber waits ``auth_retry_s`` in AUTH_FAILED with a
  visible reason and tries again.
* After every connect, ``resync()`` runs before any live event is applied (pushes are lost
  while a socket is down, fact sheet §2.1); events that arrive meanwhile wait in the socket's
  buffer and are applied after it, in order.
* Every sleep goes through the injected :class:`~jfsync.timing.Clock`.
* Nothing but :meth:`Subscriber.stop` ends the subscriber. When ``on_event`` raises on a
  UserDataChanged or LibraryChanged event (the ledger busy, the identity index not built),
  the session ends there with that reason: BACKOFF, then reconnect, and the resync after the
  connect catches up with whatever the failed event (and the frames after it) carried. Any
  other unexpected error in a session (the socket's reader failing, a bug) ends the session
  the same way, so the state never says CONNECTED while nothing reads the socket.

Log lines name the server and user; the first failure in a streak is a WARNING, repeats are
DEBUG, and the recovery is INFO with the downtime. Tokens never appear in logs or status.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from jfsync.errors import (
    AuthRejectedError,
    JfsyncError,
    ServerError,
    is_auth_error,
    is_retryable,
)
from jfsync.jellyfin.messages import (
    MAX_MESSAGE_BYTES,
    LibraryChangedMessage,
    ServerRestartingMessage,
    ServerShuttingDownMessage,
    UserDataChangedMessage,
)
from jfsync.jellyfin.socket import (
    KEEPALIVE_INTERVAL_S,
    KEEPALIVE_TIMEOUT_S,
    OPEN_TIMEOUT_S,
    JellyfinSocket,
    LiveMessage,
    SocketClosedError,
)
from jfsync.jellyfin.wire import UserItemDataDto
from jfsync.logs import FailureStreak
from jfsync.model import UserData
from jfsync.ratelimit import RepeatLimiter
from jfsync.timing import Clock, backoff_delays

logger = logging.getLogger(__name__)

#: Entries of a ``UserDataChanged`` message converted per step (the event loop is given back
#: between steps; about 2 ms each). A bulk message is handed on once its first step is
#: converted; whoever applies it converts the rest (:meth:`UserDataChangedEvent.item_steps`).
ENTRIES_PER_STEP = 1000
#: A connection that lived this long was healthy: the next failure starts backoff afresh.
HEALTHY_AFTER_S: Final = 60.0
#: Jellyfin needs a while to come back after announcing a restart; don't hammer it meanwhile.
RESTART_COOLDOWN_S: Final = 15.0
#: A refused token was already re-minted once; asking again sooner just floods the server.
AUTH_RETRY_S: Final = 300.0


class SubscriberState(enum.StrEnum):
    """Where a subscriber is in its connect / reconnect cycle."""

    IDLE = "idle"
    CONNECTING = "connecting"
    RESYNCING = "resyncing"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    AUTH_FAILED = "auth_failed"
    COOLDOWN = "cooldown"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class UserDataEntry:
    """One item's user data from a UserDataChanged message."""

    item_id: str
    data: UserData
    #: The folder's count of unplayed items (None for an item that is not a folder).
    unplayed_item_count: int | None = None

    @property
    def is_folder(self) -> bool:
        """True for a parent folder (season, series, library folder): it carries
        UnplayedItemCount."""
        return self.unplayed_item_count is not None


@dataclass(frozen=True, slots=True)
class UserDataChangedEvent:
    """The user data of some items changed for ``user_id`` on ``server``.

    A bulk message (a season or a library marked played) is handed on before all of it is
    converted: ``head`` holds its first entries, ``rest`` the server's entries after them, as
    parsed. :meth:`item_steps` converts ``rest`` a step at a time, so the first entries are
    applied (and their writes sent) while the rest is still waiting to be converted.
    """

    server: str
    user_id: str
    head: tuple[UserDataEntry, ...]
    message_id: str | None = None
    rest: tuple[UserItemDataDto, ...] = ()

    @property
    def entries(self) -> tuple[UserDataEntry, ...]:
        """Every entry, parents included (``rest`` converted now, at once)."""
        return self.head + tuple(_entries(self.rest)) if self.rest else self.head

    @property
    def item_entries(self) -> tuple[UserDataEntry, ...]:
        """The entries that are not parent folders."""
        return tuple(entry for entry in self.entries if not entry.is_folder)

    async def item_steps(self) -> AsyncGenerator[list[UserDataEntry]]:
        """:attr:`item_entries` in steps: those of ``head``, then those of each
        :data:`ENTRIES_PER_STEP` entries of ``rest``, the event loop given back between."""
        yield [entry for entry in self.head if not entry.is_folder]
        rest = self.rest
        for start in range(0, len(rest), ENTRIES_PER_STEP):
            await asyncio.sleep(0)
            yield [e for e in _entries(rest[start : start + ENTRIES_PER_STEP]) if not e.is_folder]


def _entries(dtos: Sequence[UserItemDataDto]) -> list[UserDataEntry]:
    """The entries of a message's DTOs (a DTO without an item id names nothing: skipped)."""
    return [
        UserDataEntry(dto.item_id, dto.to_user_data(), dto.unplayed_item_count)
        for dto in dtos
        if dto.item_id is not None
    ]


@dataclass(frozen=True, slots=True)
class LibraryChangedEvent:
    """Items were added, removed or updated in ``server``'s library (as seen by ``user_id``)."""

    server: str
    user_id: str
    items_added: tuple[str, ...] = ()
    items_removed: tuple[str, ...] = ()
    items_updated: tuple[str, ...] = ()
    folders_added_to: tuple[str, ...] = ()
    folders_removed_from: tuple[str, ...] = ()
    collection_folders: tuple[str, ...] = ()
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionStateChanged:
    """The subscriber of (``server``, ``user_id``) entered ``state``; ``reason`` says why."""

    server: str
    user_id: str
    state: SubscriberState
    reason: str | None = None


SubscriberEvent = UserDataChangedEvent | LibraryChangedEvent | ConnectionStateChanged

#: Returns the user's token; the argument asks for a freshly minted one (the last was refused).
GetToken = Callable[[bool], Awaitable[str]]
#: Receives every event; awaited before the next one is delivered.
OnEvent = Callable[[SubscriberEvent], Awaitable[None]]
#: Catches up with what the socket missed; awaited after every connect.
Resync = Callable[[], Awaitable[None]]
#: Returns a fresh sequence of reconnect delays in seconds.
DelaysFactory = Callable[[], Iterator[float]]


@dataclass(frozen=True, slots=True)
class SubscriberStatus:
    """A snapshot of one subscriber for the status endpoint and logs (no secrets)."""

    server: str
    user_id: str
    user_name: str
    state: SubscriberState
    connected_since_ms: int | None
    last_event_at_ms: int | None
    reconnect_count: int
    last_error: str | None
    pause_reason: str | None
    buffered_events: int
    #: Sessions ended because applying an event failed (each was caught up by a resync).
    event_failures: int = 0
    #: Why applying an event failed the last time (kept after the reconnect).
    last_event_error: str | None = None


@dataclass(frozen=True, slots=True)
class _SessionEnd:
    """How a connected session ended."""

    reason: str
    error: BaseException | None = None
    expected: bool = False  # the server announced a restart or shutdown
    handler_failed: bool = False  # on_event raised on a live event
    unexpected: bool = False  # nobody planned for this error: log it with its traceback


class Subscriber:
    """Keep one user's websocket on one server open and deliver its events in order."""

    def __init__(
        self,
        server: str,
        url: str,
        user_id: str,
        user_name: str,
        device_id: str,
        *,
        get_token: GetToken,
        on_event: OnEvent,
        resync: Resync,
        clock: Clock,
        delays: DelaysFactory = backoff_delays,
        keepalive_interval_s: float = KEEPALIVE_INTERVAL_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        open_timeout_s: float = OPEN_TIMEOUT_S,
        healthy_after_s: float = HEALTHY_AFTER_S,
        cooldown_s: float = RESTART_COOLDOWN_S,
        auth_retry_s: float = AUTH_RETRY_S,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.server = server
        self.url = url
        self.user_id = user_id
        self.user_name = user_name
        self.device_id = device_id
        self._get_token = get_token
        self._on_event = on_event
        self._resync = resync
        self._clock = clock
        self._delays = delays
        self._keepalive_interval_s = keepalive_interval_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._open_timeout_s = open_timeout_s
        self._healthy_after_s = healthy_after_s
        self._cooldown_s = cooldown_s
        self._auth_retry_s = auth_retry_s
        self._max_message_bytes = max_message_bytes
        label = f"[{server}/{user_name}]"
        # Kept across reconnects: a server that keeps sending garbage is summarised, not logged
        # line by line.
        self._bad_frames = RepeatLimiter(logger, clock, f"{label} malformed websocket frames")
        self._other_users = RepeatLimiter(
            logger, clock, f"{label} UserDataChanged messages for another user"
        )

        self._state = SubscriberState.IDLE
        self._state_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._socket: JellyfinSocket | None = None
        self._connected_at: float | None = None  # monotonic; for the healthy-connection reset
        self._connected_since_ms: int | None = None
        self._last_event_at_ms: int | None = None
        self._connections = 0
        self._last_error: str | None = None
        self._pause_reason: str | None = None
        self._event_failures = 0
        self._last_event_error: str | None = None
        self._streak = FailureStreak(logger, f"{server}/{user_name}", clock)
        #: Events that could not be applied; ended only by an event applied again.
        self._event_streak = FailureStreak(logger, f"{server}/{user_name}", clock)

    def __repr__(self) -> str:
        return f"<Subscriber {self.server}/{self.user_name} {self._state}>"

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> SubscriberState:
        """The current state."""
        return self._state

    @property
    def socket(self) -> JellyfinSocket | None:
        """The open socket, if any (for diagnostics and tests)."""
        return self._socket

    @property
    def status(self) -> SubscriberStatus:
        """A snapshot of the current state, times and last error."""
        return SubscriberStatus(
            server=self.server,
            user_id=self.user_id,
            user_name=self.user_name,
            state=self._state,
            connected_since_ms=self._connected_since_ms,
            last_event_at_ms=self._last_event_at_ms,
            reconnect_count=max(0, self._connections - 1),
            last_error=self._last_error,
            pause_reason=self._pause_reason,
            buffered_events=self._socket.buffered if self._socket is not None else 0,
            event_failures=self._event_failures,
            last_event_error=self._last_event_error,
        )

    def start(self) -> None:
        """Start connecting in a background task owned by this subscriber."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} was already started")
        self._task = asyncio.create_task(
            self._run(), name=f"jfsync-subscriber[{self.server}/{self.user_name}]"
        )

    async def stop(self) -> None:
        """Stop reconnecting, close the socket and wait for the task to end."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        if self._state is not SubscriberState.STOPPED:
            self._connected_since_ms = None
            await self._set_state(SubscriberState.STOPPED, "stopped")
            self._other_users.flush()
            logger.info("[%s/%s] subscriber stopped", self.server, self.user_name)

    async def wait_for_state(self, *states: SubscriberState) -> SubscriberState:
        """Wait (on events, not time) until the subscriber is in one of ``states``."""
        while self._state not in states:
            changed = self._state_changed
            await changed.wait()
        return self._state

    # ------------------------------------------------------------------ the state machine

    async def _run(self) -> None:
        """Connect, run a session, wait, again: until cancelled by stop()."""
        delays = self._delays()
        while True:
            try:
                delays = await self._cycle(delays)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - logged by _note_failure
                # A bug between sessions must not end the subscription either.
                self._connected_since_ms = None
                delay = next(delays)
                reason = f"unexpected error: {_describe(err)}"
                self._note_failure(reason, f"retrying in {delay:.1f} s", error=err)
                await self._pause(SubscriberState.BACKOFF, reason, delay)

    async def _cycle(self, delays: Iterator[float]) -> Iterator[float]:
        """Connect once, run the session, wait as its end asks; return the delays to go on."""
        await self._set_state(SubscriberState.CONNECTING)
        try:
            socket = await self._open()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - loop must survive
            return await self._after_connect_failure(err, delays)
        end = await self._session(socket)
        connected_at = self._connected_at
        if (
            connected_at is not None
            and self._clock.monotonic() - connected_at >= self._healthy_after_s
        ):
            delays = self._delays()
        self._connected_since_ms = None
        if end.expected:
            logger.info(
                "[%s/%s] %s; reconnecting in %.0f s",
                self.server,
                self.user_name,
                end.reason,
                self._cooldown_s,
            )
            await self._pause(SubscriberState.COOLDOWN, end.reason, self._cooldown_s)
            return self._delays()
        delay = next(delays)
        if end.handler_failed:
            self._event_failures += 1
            self._last_event_error = end.reason
            self._last_error = end.reason
            assert end.error is not None
            self._event_streak.failed(
                f"{end.reason}; reconnecting in {delay:.1f} s to catch up",
                _describe(end.error) if isinstance(end.error, JfsyncError) else end.error,
                unexpected=not isinstance(end.error, JfsyncError),
            )
        else:
            self._note_failure(
                end.reason,
                f"reconnecting in {delay:.1f} s",
                error=end.error if end.unexpected else None,
            )
        await self._pause(SubscriberState.BACKOFF, end.reason, delay)
        return delays

    async def _open(self) -> JellyfinSocket:
        """Get a token and open the socket; a refused token is re-minted once."""
        refresh = False
        while True:
            try:
                token = await self._get_token(refresh)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise _TokenFailure(err) from err
            socket = JellyfinSocket(
                self.server,
                self.url,
                user=self.user_name,
                device_id=self.device_id,
                token=token,
                clock=self._clock,
                keepalive_interval_s=self._keepalive_interval_s,
                keepalive_timeout_s=self._keepalive_timeout_s,
                open_timeout_s=self._open_timeout_s,
                max_message_bytes=self._max_message_bytes,
                bad_frames=self._bad_frames,
            )
            try:
                await socket.connect()
            except AuthRejectedError:
                if refresh:
                    raise
                logger.info(
                    "[%s/%s] the server refused the token; getting a new one",
                    self.server,
                    self.user_name,
                )
                refresh = True
                continue
            return socket

    async def _after_connect_failure(
        self, err: Exception, delays: Iterator[float]
    ) -> Iterator[float]:
        """Pick the pause after a failed connect, log it, wait it out; return the delays."""
        from_token = isinstance(err, _TokenFailure)
        if isinstance(err, _TokenFailure):
            err = err.cause
            if not isinstance(err, JfsyncError):
                logger.error(
                    "[%s/%s] the token provider failed", self.server, self.user_name, exc_info=err
                )
        if not is_retryable(err) and (is_auth_error(err) or from_token):
            # A token refused even after re-minting, or no way to get one at all (Quick
            # Connect off, a rejected key or password): nothing changes until someone acts.
            if from_token:
                reason = f"cannot get a token for {self.user_name}: {_describe(err)}"
            else:
                reason = f"the server refused {self.user_name}'s token even after minting a new one"
            self._note_failure(reason, f"retrying in {self._auth_retry_s:.0f} s")
            await self._pause(SubscriberState.AUTH_FAILED, reason, self._auth_retry_s)
            return delays
        if is_retryable(err):
            delay = next(delays)
            reason = f"cannot connect: {_describe(err)}"
        elif isinstance(err, JfsyncError):
            # 404/400 on the upgrade: a wrong URL or a proxy in the way; retry slowly.
            delay = self._auth_retry_s
            reason = f"the server refused the websocket: {_describe(err)}"
        else:
            logger.error(
                "[%s/%s] unexpected error while connecting",
                self.server,
                self.user_name,
                exc_info=err,
            )
            delay = next(delays)
            reason = f"unexpected error: {type(err).__name__}"
        self._note_failure(reason, f"retrying in {delay:.1f} s")
        await self._pause(SubscriberState.BACKOFF, reason, delay)
        return delays

    async def _session(self, socket: JellyfinSocket) -> _SessionEnd:
        """Resync, then apply live messages until the socket ends; always close it."""
        self._socket = socket
        self._connected_at = None
        try:
            await self._set_state(SubscriberState.RESYNCING)
            try:
                await self._resync()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                logger.debug("[%s/%s] resync failed", self.server, self.user_name, exc_info=True)
                return _SessionEnd(f"resync failed: {_describe(err)}", err)
            self._connected_at = self._clock.monotonic()
            self._connected_since_ms = self._clock.wall_ms()
            self._connections += 1
            self._log_connected()
            await self._set_state(SubscriberState.CONNECTED)
            try:
                return await self._read(socket)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the session ends with the reason
                return _SessionEnd(f"unexpected error: {_describe(err)}", err, unexpected=True)
        finally:
            self._socket = None
            await socket.close()

    async def _read(self, socket: JellyfinSocket) -> _SessionEnd:
        """Hand live messages to ``on_event`` in order until the session has to end."""
        while True:
            try:
                message = await socket.receive()
            except SocketClosedError as err:
                return _SessionEnd(f"connection lost: {_describe(err)}", err)
            if message is None:
                # Only close() ends the messages without an error, and the session calls it
                # last: the reader stopped without saying why.
                return _SessionEnd("the socket stopped delivering messages", unexpected=True)
            if isinstance(message, ServerRestartingMessage | ServerShuttingDownMessage):
                what = (
                    "restarting"
                    if isinstance(message, ServerRestartingMessage)
                    else "shutting down"
                )
                return _SessionEnd(f"the server is {what}", expected=True)
            event = await self._event_for(message)
            # The message is not kept while its event is applied, nor the event while
            # waiting for the next message: after a bulk action one message holds
            # thousands of entries (parsed, some 13 MB). The event holds the entries its
            # consumer has not converted yet, as parsed, until the event is applied.
            del message
            if event is None:
                continue
            self._last_event_at_ms = self._clock.wall_ms()
            try:
                await self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the session ends with the reason
                # Not dropped: the resync after the reconnect finds what the event carried.
                return _SessionEnd(
                    f"applying {type(event).__name__} failed: {_describe(err)}",
                    err,
                    handler_failed=True,
                )
            del event
            self._event_streak.succeeded("events apply")

    async def _event_for(self, message: LiveMessage) -> SubscriberEvent | None:
        """The event a live message stands for (None: nothing to pass on).

        Only the first :data:`ENTRIES_PER_STEP` entries of a bulk message are converted
        here; the event carries the rest as parsed and its consumer converts them in steps
        (ten thousand at once held the event loop for 30-35 ms, and delayed the first write
        of a bulk action by as much).
        """
        if isinstance(message, UserDataChangedMessage):
            info = message.data
            if info.user_id != self.user_id:
                # Only AdditionalUsers (fact sheet §2.4) could cause this; jfsync never adds any.
                self._other_users.log(
                    "[%s/%s] ignored a UserDataChanged for another user (%s)",
                    self.server,
                    self.user_name,
                    info.user_id,
                )
                return None
            dtos = info.user_data_list
            return UserDataChangedEvent(
                self.server,
                self.user_id,
                tuple(_entries(dtos[:ENTRIES_PER_STEP])),
                message.message_id,
                dtos[ENTRIES_PER_STEP:],
            )
        if isinstance(message, LibraryChangedMessage):
            data = message.data
            return LibraryChangedEvent(
                self.server,
                self.user_id,
                items_added=data.items_added,
                items_removed=data.items_removed,
                items_updated=data.items_updated,
                folders_added_to=data.folders_added_to,
                folders_removed_from=data.folders_removed_from,
                collection_folders=data.collection_folders,
                message_id=message.message_id,
            )
        return None

    # ------------------------------------------------------------------ helpers

    async def _set_state(self, state: SubscriberState, reason: str | None = None) -> None:
        if state is self._state and reason is None:
            return
        self._state = state
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()
        await self._emit(ConnectionStateChanged(self.server, self.user_id, state, reason))

    async def _pause(self, state: SubscriberState, reason: str, delay_s: float) -> None:
        self._pause_reason = reason
        try:
            await self._set_state(state, reason)
            await self._clock.sleep(delay_s)
        finally:
            self._pause_reason = None

    async def _emit(self, event: ConnectionStateChanged) -> None:
        """Report a state change; a handler failing on it is logged (nothing to catch up)."""
        try:
            await self._on_event(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "[%s/%s] the event handler failed on %s",
                self.server,
                self.user_name,
                type(event).__name__,
            )

    def _note_failure(
        self, what: str, next_step: str, *, error: BaseException | None = None
    ) -> None:
        """Show ``what`` on status and log it once per streak (``error``: with its traceback)."""
        self._last_error = what
        if error is None or isinstance(error, JfsyncError):
            self._streak.failed(what, next_step)
        else:
            self._streak.failed(f"{what}; {next_step}", error, unexpected=True)

    def _log_connected(self) -> None:
        if self._streak.failing:
            self._streak.succeeded("connected")
        elif self._connections > 1:
            logger.info("[%s/%s] reconnected", self.server, self.user_name)
        else:
            logger.info("[%s/%s] connected", self.server, self.user_name)
        self._last_error = None


class _TokenFailure(Exception):
    """``get_token`` failed; carries its error so the pause can say where it came from."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


def _describe(err: BaseException) -> str:
    """Text for logs and status; jfsync's own errors never hold secrets, others show the type."""
    if isinstance(err, ServerError):
        # Drop the "[server] " prefix: every log line already names the server.
        text = str(err)
        prefix = f"[{err.server}] "
        return text[len(prefix) :] if text.startswith(prefix) else text
    if isinstance(err, JfsyncError):
        return str(err)
    return type(err).__name__
