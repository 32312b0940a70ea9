"""Following playback sessions: re-read an item when its session ends or goes quiet.

Jellyfin saves playback progress without pushing it (fact sheet §3, Corrections 2): a player
that crashes or loses its connection never reports a stop, so the position it reached, and the
Played mark a progress report past 90 % sets, reach no websocket. A :class:`SessionWatcher`
per server follows what every session plays, with the server's admin API key:

* from 10.11, on a websocket subscribed with ``SessionsStart`` (§1.5: ``Sessions`` messages on
  every session and playback event, and every ``period_s``);
* on 10.9 and 10.10, where an API key cannot subscribe (§1.5), by reading ``GET /Sessions``
  every ``poll_s``; also from 10.11 when the websocket upgrade is refused (a proxy).

:class:`PlaybackTracker` (pure, times from the injected clock) turns those lists into reads:
the (user, item) of a session is read when the session stops playing that item (stopped,
another item, session gone: a crashed player's session ends when its socket closes), once when
it has gone ``quiet_s`` without a progress report (``LastPlaybackCheckIn``; the in-memory
automatic progress does not move it), and with ``live_progress_s`` every that many seconds
while it plays, so "continue on the other server" works mid-film. The watcher hands the reads
to ``on_reads`` (the service reads the item's user data and applies it like any read, so the
echo, merge and rewatch rules hold). Session lists are kept across reconnects: a session that
ended while the feed was down is read on the first list after it.

Failures are retried with backoff on the injected clock and shown in :attr:`SessionWatcher.status`;
nothing here stops replication: the periodic full reconcile repairs whatever was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from jfsync.errors import JfsyncError, ServerError, is_auth_error, is_retryable
from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.messages import (
    ServerRestartingMessage,
    ServerShuttingDownMessage,
    SessionInfo,
    SessionsMessage,
    sessions_start_frame,
)
from jfsync.jellyfin.socket import JellyfinSocket, SocketClosedError
from jfsync.logs import FailureStreak
from jfsync.tasks import cancel_and_wait
from jfsync.timing import Clock, backoff_delays

logger = logging.getLogger(__name__)

#: Period asked of the ``Sessions`` feed (it also sends on every session and playback event).
FEED_PERIOD_S: Final = 10.0
#: How often ``GET /Sessions`` is read where the feed is not open to an API key (10.9, 10.10).
POLL_S: Final = 10.0
#: Version from which an API-key socket may subscribe to ``SessionsStart`` (§1.5).
SOCKET_FROM: Final = (10, 11)

ReadReason = Literal["ended", "quiet", "progress"]


@dataclass(frozen=True, slots=True)
class PlaybackRead:
    """Read ``user_id``'s data of ``item_id`` now (server ids) because of ``reason``."""

    user_id: str
    item_id: str
    reason: ReadReason


@dataclass(slots=True)
class _Playing:
    """What one session plays, and when it last showed a player reporting."""

    item_id: str
    users: tuple[str, ...]
    #: What changes with every real progress report (check-in time, else the position).
    mark: object
    active_at: float
    read_at: float
    #: The position the session shows (live: it may move without a report).
    position_ticks: int | None = None
    quiet: bool = False


class PlaybackTracker:
    """Which (user, item) to read, from successive session lists (pure; times in seconds)."""

    def __init__(self, quiet_s: float, live_progress_s: float | None = None) -> None:
        if quiet_s <= 0:
            raise ValueError("quiet_s must be positive")
        if live_progress_s is not None and live_progress_s <= 0:
            raise ValueError("live_progress_s must be positive")
        self.quiet_s = quiet_s
        self.live_progress_s = live_progress_s
        self._playing: dict[str, _Playing] = {}
        #: Session lists taken so far.
        self.updates = 0

    @property
    def playing(self) -> int:
        """Sessions playing something now."""
        return len(self._playing)

    def update(self, sessions: Iterable[SessionInfo], now: float) -> list[PlaybackRead]:
        """Take a full session list; return the reads of playbacks that ended since the last."""
        self.updates += 1
        reads: list[PlaybackRead] = []
        seen: set[str] = set()
        for session in sessions:
            item = session.now_playing_item
            users = session.user_ids
            if item is None or not users:
                continue
            seen.add(session.id)
            mark = session.last_playback_check_in or (
                session.play_state.position_ticks,
                session.play_state.is_paused,
            )
            known = self._playing.get(session.id)
            position = session.play_state.position_ticks
            if known is not None and known.item_id == item.id and known.users == users:
                known.position_ticks = position
                if mark != known.mark:
                    known.mark = mark
                    known.active_at = now
                    known.quiet = False
                continue
            if known is not None:
                reads.extend(_reads(known, "ended"))
            self._playing[session.id] = _Playing(item.id, users, mark, now, now, position)
        for session_id in [s for s in self._playing if s not in seen]:
            reads.extend(_reads(self._playing.pop(session_id), "ended"))
        return _unique(reads)

    def position_of(self, user_id: str, item_id: str) -> int | None:
        """The position a session of ``user_id`` shows for ``item_id`` (None: not playing)."""
        for playing in self._playing.values():
            if playing.item_id == item_id and user_id in playing.users:
                return playing.position_ticks
        return None

    def due(self, now: float) -> list[PlaybackRead]:
        """Return the reads due at ``now``: sessions gone quiet, live progress."""
        reads: list[PlaybackRead] = []
        for playing in self._playing.values():
            if playing.quiet:
                continue
            if now - playing.active_at >= self.quiet_s:
                playing.quiet = True
                playing.read_at = now
                reads.extend(_reads(playing, "quiet"))
            elif self.live_progress_s is not None and now - playing.read_at >= self.live_progress_s:
                playing.read_at = now
                reads.extend(_reads(playing, "progress"))
        return _unique(reads)

    def next_due(self) -> float | None:
        """When :meth:`due` next has something (None: nothing plays, or all of it is quiet)."""
        times: list[float] = []
        for playing in self._playing.values():
            if playing.quiet:
                continue
            times.append(playing.active_at + self.quiet_s)
            if self.live_progress_s is not None:
                times.append(playing.read_at + self.live_progress_s)
        return min(times, default=None)


def _reads(playing: _Playing, reason: ReadReason) -> Iterator[PlaybackRead]:
    return (PlaybackRead(user, playing.item_id, reason) for user in playing.users)


def _unique(reads: list[PlaybackRead]) -> list[PlaybackRead]:
    """One read per (user, item): two sessions of one user playing one item read it once."""
    found: dict[tuple[str, str], PlaybackRead] = {}
    for read in reads:
        found.setdefault((read.user_id, read.item_id), read)
    return list(found.values())


class WatcherState(enum.StrEnum):
    """Where a session watcher is."""

    IDLE = "idle"
    CONNECTING = "connecting"
    FOLLOWING = "following"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class WatcherStatus:
    """A snapshot of one watcher for the status endpoint (no secrets)."""

    server: str
    #: ``socket`` (the Sessions feed) or ``poll`` (``GET /Sessions``).
    mode: str
    state: WatcherState
    playing: int
    reads: int
    last_error: str | None


OnReads = Callable[[str, list[PlaybackRead]], Awaitable[None]]
DelaysFactory = Callable[[], Iterator[float]]


class _Source(Protocol):
    async def next_list(self) -> tuple[SessionInfo, ...]: ...


class SessionWatcher:
    """Follow one server's playback sessions and hand the reads due to ``on_reads``."""

    def __init__(
        self,
        server: str,
        url: str,
        client: JellyfinClient,
        *,
        api_key: str,
        version: tuple[int, int, int] | None,
        clock: Clock,
        on_reads: OnReads,
        quiet_s: float,
        live_progress_s: float | None = None,
        feed_period_s: float = FEED_PERIOD_S,
        poll_s: float = POLL_S,
        delays: DelaysFactory = backoff_delays,
        socket_options: dict[str, float] | None = None,
    ) -> None:
        self.server = server
        self.url = url
        self.client = client
        self.mode = "socket" if version is not None and version[:2] >= SOCKET_FROM else "poll"
        self.tracker = PlaybackTracker(quiet_s, live_progress_s)
        self._api_key = api_key
        self._clock = clock
        self._on_reads = on_reads
        self._feed_period_s = feed_period_s
        self._poll_s = poll_s
        self._delays = delays
        self._socket_options = socket_options or {}
        self._state = WatcherState.IDLE
        self._reads = 0
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._streak = FailureStreak(logger, f"{server} sessions", clock)
        self._changed = asyncio.Event()
        #: True while the watcher waits for the next list or timer (both already armed).
        self._waiting = False

    def __repr__(self) -> str:
        return f"<SessionWatcher {self.server} {self.mode} {self._state}>"

    @property
    def status(self) -> WatcherStatus:
        """The current state, what plays and the last error."""
        return WatcherStatus(
            server=self.server,
            mode=self.mode,
            state=self._state,
            playing=self.tracker.playing,
            reads=self._reads,
            last_error=self._last_error,
        )

    def start(self) -> None:
        """Start following in a background task."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} was already started")
        self._task = asyncio.create_task(self._run(), name=f"jfsync-sessions[{self.server}]")

    async def stop(self) -> None:
        """Stop following and wait for the task to end."""
        if self._task is not None:
            await cancel_and_wait([self._task], logger)
        self._set_state(WatcherState.STOPPED)

    async def wait_for_state(self, state: WatcherState) -> None:
        """Wait (on events, not time) until the watcher is in ``state``."""
        await self.wait_for(lambda: self._state is state)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait (on events, not time) until ``predicate`` holds; re-checked on every change
        of state and after every list or timer acted on."""
        while not predicate():
            changed = self._changed
            await changed.wait()

    async def wait_for_updates(self, count: int) -> None:
        """Wait (on events, not time) until ``count`` session lists were taken and acted on,
        and the watcher waits again with its timers armed (a ManualClock may be advanced)."""
        await self.wait_until(lambda: self.tracker.updates >= count)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (on events, not time) until ``predicate`` holds after a list or timer was
        acted on, and the watcher waits again with its timers armed."""
        await self.wait_for(lambda: self._waiting and predicate())

    def _set_state(self, state: WatcherState) -> None:
        self._state = state
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        delays = self._delays()
        while True:
            self._set_state(WatcherState.CONNECTING)
            taken = self.tracker.updates
            try:
                async with self._source() as source:
                    await self._follow(source)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - logged by the streak, retried below
                if self.tracker.updates > taken:
                    # It worked for a while: back off afresh.
                    delays = self._delays()
                delay = next(delays)
                self._last_error = _describe(err)
                self._streak.failed(
                    f"cannot follow playback sessions ({self.mode}); retrying in {delay:.1f} s",
                    self._last_error if isinstance(err, JfsyncError) else err,
                    unexpected=not isinstance(err, JfsyncError),
                )
                self._set_state(WatcherState.BACKOFF)
                await self._clock.sleep(delay)

    @contextlib.asynccontextmanager
    async def _source(self) -> AsyncIterator[_Source]:
        if self.mode == "poll":
            yield _Poll(self.client, self._clock, self._poll_s)
            return
        socket = JellyfinSocket(
            self.server,
            self.url,
            user="sessions",
            device_id=f"jfsync-sessions-{self.server}",
            token=self._api_key,
            clock=self._clock,
            **self._socket_options,  # type: ignore[arg-type]
        )
        try:
            try:
                await socket.connect()
            except JfsyncError as err:
                if not is_retryable(err) and not is_auth_error(err):
                    # A proxy that refuses websockets (404, 400): GET /Sessions works there.
                    self.mode = "poll"
                    logger.warning(
                        "[%s] the server refused the sessions websocket (%s); reading "
                        "GET /Sessions every %.0f s instead",
                        self.server,
                        _describe(err),
                        self._poll_s,
                    )
                raise
            await socket.send(sessions_start_frame(round(self._feed_period_s * 1000)))
            yield _Feed(socket)
        finally:
            await socket.close()

    async def _follow(self, source: _Source) -> None:
        """Apply session lists and timeouts until the source fails."""
        getter: asyncio.Task[tuple[SessionInfo, ...]] | None = None
        sleeper: asyncio.Task[None] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.create_task(
                        source.next_list(), name=f"jfsync-sessions-read[{self.server}]"
                    )
                waits: set[asyncio.Task[Any]] = {getter}
                due = self.tracker.next_due()
                if due is not None:
                    sleeper = asyncio.create_task(
                        self._clock.sleep(due - self._clock.monotonic()),
                        name=f"jfsync-sessions-timer[{self.server}]",
                    )
                    waits.add(sleeper)
                # One loop turn: the new tasks take their first step (their sleeps start).
                await asyncio.sleep(0)
                self._waiting = True
                self._notify()
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._waiting = False
                if sleeper is not None:
                    await cancel_and_wait([sleeper], logger)
                    sleeper = None
                now = self._clock.monotonic()
                reads: list[PlaybackRead] = []
                if getter.done():
                    sessions = getter.result()
                    getter = None
                    reads.extend(self.tracker.update(sessions, now))
                    if self._state is not WatcherState.FOLLOWING:
                        self._following()
                reads.extend(self.tracker.due(now))
                if reads:
                    await self._hand_over(reads)
        finally:
            # A task that ended has had its result or error taken above.
            left = [t for t in (getter, sleeper) if t is not None and not t.done()]
            await cancel_and_wait(left, logger)

    def _following(self) -> None:
        """The first session list after a (re)connect arrived."""
        self._last_error = None
        self._streak.succeeded("following playback sessions")
        logger.debug("[%s] following playback sessions (%s)", self.server, self.mode)
        self._set_state(WatcherState.FOLLOWING)

    async def _hand_over(self, reads: list[PlaybackRead]) -> None:
        """Give the reads to ``on_reads``; a failure is logged (the reconcile repairs it)."""
        self._reads += len(reads)
        for read in reads:
            logger.debug(
                "[%s] playback of %s by %s %s: reading it",
                self.server,
                read.item_id,
                read.user_id,
                {"ended": "ended", "quiet": "went quiet", "progress": "goes on"}[read.reason],
            )
        try:
            await self._on_reads(self.server, reads)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            logger.warning(
                "[%s] reading %d playing items failed: %s (the next reconcile catches up)",
                self.server,
                len(reads),
                _describe(err),
                exc_info=not isinstance(err, JfsyncError),
            )


class _Poll:
    """Session lists from ``GET /Sessions``: one at once, then one every ``period_s``."""

    def __init__(self, client: JellyfinClient, clock: Clock, period_s: float) -> None:
        self._client = client
        self._clock = clock
        self._period_s = period_s
        self._first = True

    async def next_list(self) -> tuple[SessionInfo, ...]:
        if not self._first:
            await self._clock.sleep(self._period_s)
        self._first = False
        return tuple(await self._client.sessions())


class _Feed:
    """Session lists from ``Sessions`` messages on a subscribed socket."""

    def __init__(self, socket: JellyfinSocket) -> None:
        self._socket = socket

    async def next_list(self) -> tuple[SessionInfo, ...]:
        while True:
            message = await self._socket.receive()
            if message is None:
                raise SocketClosedError(self._socket.server, "the sessions socket was closed")
            if isinstance(message, SessionsMessage):
                return message.data
            if isinstance(message, ServerRestartingMessage | ServerShuttingDownMessage):
                raise SocketClosedError(self._socket.server, "the server is restarting")


def _describe(err: BaseException) -> str:
    if isinstance(err, ServerError):
        text, prefix = str(err), f"[{err.server}] "
        return text[len(prefix) :] if text.startswith(prefix) else text
    if isinstance(err, JfsyncError):
        return str(err)
    return f"{type(err).__name__}: {err}"
