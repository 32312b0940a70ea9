"""Websocket sessions of the emulated server: binding, routing, the debounce and the watchdog.

This is the part of Jellyfin that decides who hears what (fact sheet §1, §2): sockets bind to
sessions keyed by Client+DeviceId; a session reaches one socket, its most recently active open
one; ``UserDataChanged`` goes only to sessions containing the user, after ONE global trailing
debounce, with DTOs built at flush time; the KeepAlive watchdog ticks every 12 s. All timing goes
through the injected :class:`jfsync.timing.Clock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from jfsync.emulator.state import Caller, ServerVersion
from jfsync.ids import session_id
from jfsync.timing import Clock

logger = logging.getLogger(__name__)

#: ``SWL.WebSocketLostTimeout``: a socket silent this long is lost (§1.4).
LOST_TIMEOUT_S = 60.0
#: Watchdog period: 60 s x ``IntervalFactor`` 0.2.
WATCHDOG_INTERVAL_S = LOST_TIMEOUT_S * 0.2
#: Past 60 s x ``ForceKeepAliveFactor`` 0.75 the watchdog asks for a KeepAlive again.
FORCE_KEEPALIVE_AFTER_S = LOST_TIMEOUT_S * 0.75
#: ``Data`` of ForceKeepAlive: the lost timeout in seconds.
FORCE_KEEPALIVE_DATA = 60
#: Guard against a client that stops reading: a send that cannot drain is abandoned.
SEND_GUARD_S = 10.0
#: Close code and reason when a session ends (logout, revoked token, device replaced; 10.9+).
SESSION_END_CODE = 1000
SESSION_END_REASON = b"System Shutdown"
#: How many sent messages the hub remembers (for tests and the demo).
_SENT_KEPT = 100_000
#: Tiny slack so float rounding of ManualClock steps never skips a due deadline.
_EPS_S = 1e-6

#: Builds the current ``UserItemDataDto`` of (user, item) for a push; None when the item is gone.
DtoBuilder = Callable[[str, str], dict[str, Any] | None]
#: Builds the ``Data`` of a ``Sessions`` message as the given caller may see it.
SessionsData = Callable[[Caller], list[dict[str, Any]]]


def message_id() -> str:
    """Return a fresh MessageId (a Guid, 32 hex)."""
    return uuid.uuid4().hex


@dataclass(eq=False)
class SocketConn:
    """One accepted websocket."""

    ws: web.WebSocketResponse
    request: web.Request
    caller: Caller
    opened_at: float
    last_activity: float
    last_keepalive: float
    session: Session | None = None
    half_open: bool = False
    watched: bool = False
    #: The ``SessionsStart`` subscription sending periodic ``Sessions`` messages, if any.
    sessions_feed: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        """Tell whether the server still considers this socket open."""
        return not self.ws.closed


@dataclass(eq=False)
class Session:
    """A Jellyfin session: Client+DeviceId, its user, extra users and its sockets."""

    client: str
    device_id: str
    device_name: str
    app_version: str
    user_id: str | None
    last_activity_ms: int
    additional_users: list[str] = field(default_factory=list)
    sockets: list[SocketConn] = field(default_factory=list)
    #: What the session plays (``NowPlayingItem``) and where (``PlayState``), from reports.
    now_playing: str | None = None
    position_ticks: int | None = None
    is_paused: bool = False
    play_method: str | None = None
    last_checkin_ms: int | None = None
    #: ``ClientCapabilities`` the client posted.
    playable_media_types: list[str] = field(default_factory=list)
    supported_commands: list[str] = field(default_factory=list)
    supports_media_control: bool = False

    @property
    def key(self) -> str:
        """``SM.GetSessionKey``: Client + DeviceId."""
        return self.client + self.device_id

    @property
    def id(self) -> str:
        """``SessionInfo.Id``: MD5 of the key as 32 hex."""
        return session_id(self.client, self.device_id)

    def contains_user(self, user_id: str) -> bool:
        """``SessionInfo.ContainsUser``: the session's user or one of its additional users."""
        return self.user_id == user_id or user_id in self.additional_users

    def target_socket(self) -> SocketConn | None:
        """``WSCtl.SendMessage``: the open socket with the latest activity, if any."""
        open_sockets = [s for s in self.sockets if s.is_open]
        if not open_sockets:
            return None
        return max(open_sockets, key=lambda s: s.last_activity)


class Debouncer:
    """A trailing debounce on the injected clock: :meth:`poke` re-arms, quiet runs ``flush``."""

    def __init__(
        self,
        clock: Clock,
        delay_s: float,
        flush: Callable[[], Awaitable[None]],
        name: str,
    ) -> None:
        self.clock = clock
        self.delay_s = delay_s
        self._flush = flush
        self._name = name
        self._deadline = 0.0
        self._pokes = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def poke(self) -> None:
        """(Re)arm the timer: ``flush`` runs once ``delay_s`` passes without another poke."""
        self._deadline = self.clock.monotonic() + self.delay_s
        self._pokes += 1
        if self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    @property
    def armed(self) -> bool:
        """Tell whether a flush is pending or running."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            while (remaining := self._deadline - self.clock.monotonic()) > _EPS_S:
                await self.clock.sleep(remaining - _EPS_S / 2)
            pokes = self._pokes
            await self._flush()
            # A poke while the flush was sending queued more work: wait for quiet again.
            if self._pokes == pokes:
                return

    async def close(self) -> None:
        """Cancel a pending flush and refuse new ones until :meth:`reopen`."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reopen(self) -> None:
        """Accept pokes again."""
        self._closed = False


class SocketHub:
    """Sessions, sockets, the user-data debounce and the KeepAlive watchdog of one server."""

    def __init__(
        self,
        *,
        clock: Clock,
        version: ServerVersion,
        debounce_s: float,
        build_dto: DtoBuilder,
        parent_of: Callable[[str], str | None],
        server_name: str,
        sessions_data: SessionsData | None = None,
    ) -> None:
        self.clock = clock
        self.version = version
        self._sessions_data = sessions_data
        self._build_dto = build_dto
        self._parent_of = parent_of
        self._server_name = server_name
        self.sessions: dict[str, Session] = {}
        self.sockets: list[SocketConn] = []
        self._pending: dict[str, dict[str, None]] = {}
        self._debouncer = Debouncer(
            clock, debounce_s, self.flush_user_data, f"emulator[{server_name}]-userdata-debounce"
        )
        self._watchdog_task: asyncio.Task[None] | None = None
        self._watch: list[SocketConn] = []
        self._closing = False
        #: Short tasks closing ended sessions' sockets or sending event-driven Sessions lists.
        self._closers: set[asyncio.Task[Any]] = set()
        self.sent: deque[tuple[SocketConn, dict[str, Any]]] = deque(maxlen=_SENT_KEPT)

    # --- sessions ------------------------------------------------------------------------

    def log_session_activity(
        self,
        client: str,
        app_version: str,
        device_id: str,
        device_name: str,
        user_id: str | None,
    ) -> Session:
        """``SM.LogSessionActivity``: find or create the session and point it at ``user_id``."""
        key = client + device_id
        now_ms = self.clock.wall_ms()
        session = self.sessions.get(key)
        if session is None:
            session = Session(client, device_id, device_name, app_version, user_id, now_ms)
            self.sessions[key] = session
            self.sessions_changed()
        # GetSessionInfo overwrites the user on every call and drops extra users with no user.
        session.user_id = user_id
        if user_id is None:
            session.additional_users.clear()
        session.last_activity_ms = now_ms
        session.app_version = app_version or session.app_version
        session.device_name = device_name or session.device_name
        return session

    def end_sessions_for_device(self, device_id: str) -> None:
        """``SM.Logout``: end every session on this device id and close its sockets.

        From 10.9 the server closes them with 1000 "System Shutdown" (Corrections 6); 10.8
        drops the connection.
        """
        for key, session in list(self.sessions.items()):
            if session.device_id.lower() == device_id.lower():
                del self.sessions[key]
                for conn in list(session.sockets):
                    self.end_socket(conn)
                self.sessions_changed()

    def end_socket(self, conn: SocketConn) -> None:
        """Close one socket because its session ended (1000 "System Shutdown" from 10.9)."""
        if not self.version.at_least(10, 9) or conn.half_open:
            self._abort(conn)
            return
        task = asyncio.get_running_loop().create_task(
            self._close_socket(conn), name=f"emulator[{self._server_name}]-session-end"
        )
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _close_socket(self, conn: SocketConn) -> None:
        try:
            async with asyncio.timeout(SEND_GUARD_S):
                await conn.ws.close(code=SESSION_END_CODE, message=SESSION_END_REASON)
        except (ConnectionError, RuntimeError, TimeoutError):
            self._abort(conn)

    def session_by_id(self, sid: str) -> Session | None:
        """Return the session with this id."""
        return next((s for s in self.sessions.values() if s.id == sid), None)

    def socket_count(self, user_id: str | None = None) -> int:
        """Count open sockets, or those bound to sessions containing ``user_id``."""
        if user_id is None:
            return sum(1 for s in self.sockets if s.is_open)
        return sum(
            1
            for s in self.sockets
            if s.is_open and s.session is not None and s.session.contains_user(user_id)
        )

    # --- one socket ----------------------------------------------------------------------

    async def serve(
        self, request: web.Request, caller: Caller, token_client: str | None
    ) -> web.WebSocketResponse:
        """Accept a websocket, bind it to its session and serve it until it closes."""
        ws = web.WebSocketResponse(autoping=True, autoclose=True)
        await ws.prepare(request)
        now = self.clock.monotonic()
        conn = SocketConn(ws, request, caller, now, now, now)
        self.sockets.append(conn)
        try:
            session = self._bind(conn, request, token_client)
            if session is not None:
                conn.session = session
                session.sockets.append(conn)
                await self._send(conn, _envelope("ForceKeepAlive", FORCE_KEEPALIVE_DATA))
                self._start_watching(conn)
            await self._receive_loop(conn)
        finally:
            self._forget(conn)
        return ws

    async def _receive_loop(self, conn: SocketConn) -> None:
        async for msg in conn.ws:
            if conn.half_open:
                continue
            conn.last_activity = self.clock.monotonic()
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                message = json.loads(msg.data)
                if not isinstance(message, dict):
                    raise TypeError("not an object")
            except (ValueError, TypeError) as err:
                # WSC.ProcessInternal logs and drops what it cannot parse.
                logger.warning(
                    "[%s] dropped an invalid websocket message: %s", self._server_name, err
                )
                continue
            kind = message.get("MessageType")
            if kind == "KeepAlive":
                conn.last_keepalive = self.clock.monotonic()
                await self._send(conn, {"MessageType": "KeepAlive", "MessageId": message_id()})
            elif kind == "SessionsStart":
                self._start_sessions_feed(conn, message.get("Data"))
            elif kind == "SessionsStop":
                self._stop_sessions_feed(conn)
            else:
                logger.debug("[%s] ignored inbound %r", self._server_name, kind)

    def _bind(
        self, conn: SocketConn, request: web.Request, token_client: str | None
    ) -> Session | None:
        caller = conn.caller
        if self.version.socket_device_id_query:
            # 10.8-10.10 (SWL.GetSession): API keys never bind; the session uses the token's
            # stored client name and the deviceId query parameter if present.
            if caller.is_api_key or caller.user is None:
                return None
            query = {k.lower(): v for k, v in request.query.items()}
            device_id = query.get("deviceid") or caller.device_id or ""
            client = token_client or caller.client or ""
        else:
            device_id = caller.device_id or ""
            client = caller.client or ""
        return self.log_session_activity(
            client, caller.version or "", device_id, caller.device or "", caller.user_id
        )

    # --- the Sessions feed (SessionInfoWebSocketListener, §1.5) ---------------------------

    def may_watch_sessions(self, caller: Caller) -> bool:
        """Who may subscribe: anyone on 10.8; admin users only on 10.9-10.10 (an API key
        fails on a null user); any authenticated socket from 10.11."""
        if self.version.at_least(10, 11) or not self.version.at_least(10, 9):
            return True
        return caller.user is not None and caller.user.is_admin

    def _start_sessions_feed(self, conn: SocketConn, data: Any) -> None:
        try:
            due_ms, period_ms = (int(part) for part in str(data).split(","))
        except ValueError:
            # BasePeriodicWebSocketListener throws on a malformed Data; WSC logs and drops it.
            logger.warning("[%s] malformed SessionsStart data %r", self._server_name, data)
            return
        if self._sessions_data is None or not self.may_watch_sessions(conn.caller):
            logger.warning("[%s] SessionsStart refused for this socket", self._server_name)
            return
        self._stop_sessions_feed(conn)
        conn.sessions_feed = asyncio.get_running_loop().create_task(
            self._sessions_feed(conn, due_ms / 1000, period_ms / 1000),
            name=f"emulator[{self._server_name}]-sessions-feed",
        )

    def sessions_changed(self) -> None:
        """A session started or ended, playback started, progressed or stopped, or a client
        posted capabilities: every ``Sessions`` subscriber gets the list now (``SendData(true)``
        in SessionInfoWebSocketListener), besides its periodic sends."""
        if self._sessions_data is None or self._closing:
            return
        for conn in self.sockets:
            if conn.sessions_feed is None or conn.sessions_feed.done():
                continue
            task = asyncio.get_running_loop().create_task(
                self._send(conn, _envelope("Sessions", self._sessions_data(conn.caller))),
                name=f"emulator[{self._server_name}]-sessions-event",
            )
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    def _stop_sessions_feed(self, conn: SocketConn) -> None:
        task, conn.sessions_feed = conn.sessions_feed, None
        if task is not None and not task.done():
            task.cancel()

    async def _sessions_feed(self, conn: SocketConn, due_s: float, period_s: float) -> None:
        assert self._sessions_data is not None
        await self.clock.sleep(max(due_s, 0.0))
        while conn.is_open:
            await self._send(conn, _envelope("Sessions", self._sessions_data(conn.caller)))
            if period_s <= 0:
                return
            await self.clock.sleep(period_s)

    def _forget(self, conn: SocketConn) -> None:
        self._stop_sessions_feed(conn)
        if conn in self.sockets:
            self.sockets.remove(conn)
        if conn in self._watch:
            self._watch.remove(conn)
        session = conn.session
        if session is not None and conn in session.sockets:
            session.sockets.remove(conn)
            # SM.CloseIfNeededAsync: a session without active sockets ends.
            if not session.sockets and self.sessions.get(session.key) is session:
                del self.sessions[session.key]
                self.sessions_changed()

    # --- sending -------------------------------------------------------------------------

    async def _send(self, conn: SocketConn, payload: dict[str, Any]) -> bool:
        if conn.half_open or not conn.is_open:
            return False
        try:
            async with asyncio.timeout(SEND_GUARD_S):
                await conn.ws.send_str(json.dumps(payload, separators=(",", ":")))
        except (ConnectionError, RuntimeError, TimeoutError) as err:
            logger.debug("[%s] send failed: %s", self._server_name, err)
            return False
        self.sent.append((conn, payload))
        return True

    async def send_to_sessions(self, sessions: list[Session], payload: dict[str, Any]) -> int:
        """Send one message (one MessageId) to each session's target socket; return how many."""
        count = 0
        for session in sessions:
            conn = session.target_socket()
            if conn is not None and await self._send(conn, payload):
                count += 1
        return count

    async def broadcast(self, kind: str, data: Any = None) -> int:
        """``SM.SendMessageToSessions`` over every session (for server-wide messages)."""
        payload = _envelope(kind, data)
        return await self.send_to_sessions(list(self.sessions.values()), payload)

    async def send_to_users(self, kind: str, per_user: dict[str, Any]) -> None:
        """Send each user's ``Data`` to that user's sessions, one MessageId per user."""
        for user_id, data in per_user.items():
            targets = [s for s in self.sessions.values() if s.contains_user(user_id)]
            if targets:
                await self.send_to_sessions(targets, _envelope(kind, data))

    # --- user data debounce ----------------------------------------------------------------

    def user_data_saved(self, user_id: str, item_id: str) -> None:
        """``UDCN``: queue (user, item, parent) and re-arm the global trailing debounce."""
        queued = self._pending.setdefault(user_id, {})
        queued[item_id] = None
        parent = self._parent_of(item_id)
        if parent is not None:
            queued[parent] = None
        self._debouncer.poke()

    @property
    def pushes_pending(self) -> bool:
        """Tell whether a UserDataChanged flush is armed or being sent."""
        return self._debouncer.armed

    @property
    def debounce_s(self) -> float:
        """The UserDataChanged trailing debounce (Jellyfin: 500 ms)."""
        return self._debouncer.delay_s

    @debounce_s.setter
    def debounce_s(self, value: float) -> None:
        self._debouncer.delay_s = value

    async def flush_user_data(self) -> None:
        """Send what the debounce collected: one ``UserDataChanged`` per user, current DTOs."""
        pending, self._pending = self._pending, {}
        for user_id, item_ids in pending.items():
            targets = [s for s in self.sessions.values() if s.contains_user(user_id)]
            if not targets:
                # No session: the event is lost and the data function never runs (§2.1).
                continue
            dtos = [d for d in (self._build_dto(user_id, i) for i in item_ids) if d is not None]
            data = {"UserId": user_id, "UserDataList": dtos}
            await self.send_to_sessions(targets, _envelope("UserDataChanged", data))

    # --- watchdog ------------------------------------------------------------------------

    def _start_watching(self, conn: SocketConn) -> None:
        conn.watched = True
        self._watch.append(conn)
        if not self._closing and (self._watchdog_task is None or self._watchdog_task.done()):
            self._watchdog_task = asyncio.get_running_loop().create_task(
                self._watchdog(), name=f"emulator[{self._server_name}]-keepalive-watchdog"
            )

    async def _watchdog(self) -> None:
        while self._watch:
            await self.clock.sleep(WATCHDOG_INTERVAL_S)
            await self._watchdog_tick()

    async def _watchdog_tick(self) -> None:
        now = self.clock.monotonic()
        for conn in list(self._watch):
            silent_s = now - conn.last_keepalive
            if silent_s >= LOST_TIMEOUT_S - _EPS_S:
                self._watch.remove(conn)
                conn.watched = False
                if self.version.watchdog_closes:
                    logger.info("[%s] closing a lost websocket", self._server_name)
                    self._abort(conn)
            elif silent_s > FORCE_KEEPALIVE_AFTER_S:
                await self._send(conn, _envelope("ForceKeepAlive", FORCE_KEEPALIVE_DATA))

    # --- controls ------------------------------------------------------------------------

    async def drop_all(self) -> None:
        """Close every socket with a close frame (half-open ones are aborted)."""
        for conn in list(self.sockets):
            if conn.half_open:
                self._abort(conn)
            else:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await conn.ws.close(code=1001, message=b"server going away")

    def half_open_all(self) -> int:
        """Stop reading and writing on every open socket without closing it."""
        count = 0
        for conn in self.sockets:
            if conn.is_open and not conn.half_open:
                conn.half_open = True
                transport = conn.request.transport
                if transport is not None:
                    # Nothing read means no pong and no close reply: the client sees silence.
                    transport.pause_reading()
                count += 1
        return count

    def _abort(self, conn: SocketConn) -> None:
        transport = conn.request.transport
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        """Stop the timers and drop every socket."""
        self._closing = True
        await self._debouncer.close()
        self._pending.clear()
        task, self._watchdog_task = self._watchdog_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for closer in list(self._closers):
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closer
        for conn in list(self.sockets):
            feed, conn.sessions_feed = conn.sessions_feed, None
            if feed is not None and not feed.done():
                feed.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed
            self._abort(conn)
        self._watch.clear()

    def reopen(self) -> None:
        """Allow timers again after :meth:`close` (listener restart)."""
        self._closing = False
        self._debouncer.reopen()


def _envelope(kind: str, data: Any = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"MessageType": kind}
    if data is not None:
        payload["Data"] = data
    payload["MessageId"] = message_id()
    return payload
