"""The replicator behind ``jfsync run``: wires servers, subscribers, the ledger and pushers.

:class:`SyncService` owns one aiohttp session, one :class:`Ledger`, and per configured server a
REST client, a token provider, a :class:`Pusher` (the server as a peer) and a
:class:`Subscriber` per synced user (the server as a source). Each server is brought up by a
task of its own that retries, whatever the failure, until the server answers and its users are
subscribed, so one server being down at start neither blocks nor breaks the others: its rows
queue and it catches up when it returns. The same task then keeps the server's user list
fresh (every ``sync.user_refresh_interval`` and after a socket of that server reconnects):
accounts matched since are subscribed (their first catch-up is the usual backfill), accounts
no longer synced have their subscriber stopped.

Data flow: a websocket event goes to :class:`jfsync.sync.intake.Intake`, a catch-up scan after
every (re)connect to the :class:`Reconciler`; both become ledger observations (one transaction
each batch: echo rule, diff, stamp, merge, outbox rows), and the pushers of the peers owed
something are woken and write it. Shutdown stops intake first
(subscribers), lets pushers finish writes under way within ``sync.shutdown_grace``, then closes
the clients' write lanes, the HTTP session and the ledger.

Config edits: :meth:`SyncService.reconfigure` applies a new config while running
(:mod:`jfsync.reload` says what each change needs); :mod:`jfsync.ops.runcmd` runs the service
in a process (signals, the status server, watching the config file). The merge policy the
ledger applies follows the config and each person's ``users.choices``
(:meth:`SyncService.merge_policy`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from jfsync import __version__
from jfsync.config import Config, ServerConfig
from jfsync.errors import (
    AuthRejectedError,
    HttpStatusError,
    JfsyncError,
    ServerError,
    UnsupportedServerError,
)
from jfsync.jellyfin.api import JellyfinClient, parse_version
from jfsync.jellyfin.wire import UserDto
from jfsync.logs import FailureStreak
from jfsync.ops import snapshot
from jfsync.ops.activity import ActivityFeed
from jfsync.ops.alerts import Alerter
from jfsync.reload import diff_configs, restart_note
from jfsync.sync.delivery import Delivered, DeliveryWatcher, Pusher, WriteHook
from jfsync.sync.identity import IdenticalIds, IndexedIdentity, ItemIdentity
from jfsync.sync.intake import Counters, Intake
from jfsync.sync.ledger import Applied, Ledger, Outcome
from jfsync.sync.merge import MergePolicy
from jfsync.sync.priority import LiveFirst
from jfsync.sync.reconcile import Reconciler, ReconcileReport
from jfsync.sync.resetguard import ResetGuard, ResetRule, describe_hold
from jfsync.sync.sessions import SessionWatcher
from jfsync.sync.subscriber import (
    ConnectionStateChanged,
    LibraryChangedEvent,
    Subscriber,
    SubscriberEvent,
    SubscriberState,
    UserDataChangedEvent,
)
from jfsync.sync.tokens import UserTokens, user_device_id
from jfsync.sync.users import UserMatch, match_users, person_fields
from jfsync.tasks import cancel_and_wait
from jfsync.timing import Clock, SystemClock, backoff_delays

logger = logging.getLogger(__name__)

#: Observations applied per ledger transaction during a catch-up scan.
SCAN_BATCH = 1000
#: How long a catch-up waits for the peer's pusher to check writes cut off by a restart.
RECOVERY_WAIT_S = 10.0
#: How long a bring-up waits after an answer that needs someone to act (a refused key, a
#: server too old to sync: upgraded, it is taken up then).
BRING_UP_SLOW_RETRY_S = 300.0
#: Backoff of a bring-up or user-list refresh that failed in a way that may pass by itself.
BRING_UP_INITIAL_S = 1.0
BRING_UP_MAX_S = 60.0


@dataclass(slots=True)
class ServerLink:
    """Everything jfsync holds for one configured server."""

    config: ServerConfig
    index: int
    client: JellyfinClient
    pusher: Pusher
    tokens: UserTokens | None = None
    server_id: str | None = None
    version: str | None = None
    reachable: bool = False
    last_error: str | None = None
    users: list[UserDto] | None = None
    #: remote user id -> canonical user key, for every synced user of this server.
    user_keys: dict[str, str] = field(default_factory=dict)
    subscribers: dict[str, Subscriber] = field(default_factory=dict)
    #: Brings the server up, then keeps its user list fresh (until stop()).
    bring_up: asyncio.Task[None] | None = None
    #: When the user list was last read (wall ms).
    users_refreshed_ms: int | None = None
    #: Set to read the user list again soon (a socket of this server reconnected).
    refresh_users: asyncio.Event = field(default_factory=asyncio.Event)
    #: Follows the server's playback sessions (``sync.follow_sessions``), once it answered.
    sessions: SessionWatcher | None = None

    @property
    def name(self) -> str:
        """The server's config name."""
        return self.config.name


class ServerTokenStore:
    """The ledger's token store, keyed by config name as well as server id.

    Servers cloned from one installation report the same ServerId (and user ids), so a key of
    server id alone would let one server's token overwrite the other's.
    """

    def __init__(self, ledger: Ledger, name: str) -> None:
        self._ledger = ledger
        self._name = name

    async def load_token(self, server_id: str, user_id: str) -> str | None:
        """Return the stored token, if any."""
        return await self._ledger.load_token(f"{self._name}/{server_id}", user_id)

    async def save_token(self, server_id: str, user_id: str, token: str) -> None:
        """Store the token."""
        await self._ledger.save_token(f"{self._name}/{server_id}", user_id, token)

    async def forget_token(self, server_id: str, user_id: str) -> None:
        """Forget the token."""
        await self._ledger.forget_token(f"{self._name}/{server_id}", user_id)


class _DeliveryReport(DeliveryWatcher):
    """Writes the pushers recorded: to the write observers (metrics) and the activity feed."""

    def __init__(self, service: SyncService) -> None:
        self._service = service

    def written(self, peer: str, writes: Sequence[Delivered]) -> None:
        """Report each write's latency and put it in the activity feed."""
        service = self._service
        for write in writes:
            row = write.row
            try:
                for observer in service.write_observers:
                    observer(peer, write.latency_s)
                service.activity.record_write(
                    peer=row.peer,
                    user=row.user,
                    item=row.item,
                    registers=row.registers,
                    done_ms=write.done_ms,
                    latency_s=write.latency_s,
                )
            except Exception:
                # A failing observer must not stop the reports of the other writes.
                logger.exception("[→%s] reporting a recorded write failed", peer)


class SyncService:
    """Run jfsync against the configured servers until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        identity: ItemIdentity | None = None,
        subscriber_options: dict[str, Any] | None = None,
        pusher_options: dict[str, Any] | None = None,
        reconcile_options: dict[str, Any] | None = None,
        alert_options: dict[str, Any] | None = None,
        session_options: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.counters = Counters()
        #: Issue 14: the identity is made here (and again by a reload), unless one was given.
        self._own_identity = identity is None
        #: The config file's reload state for /status (set by jfsync.ops.reloader.ConfigReloader).
        self.config_status: dict[str, Any] | None = None
        self._reload_lock = asyncio.Lock()
        self.ledger = Ledger(
            config.ledger, MergePolicy.from_config(config), user_map=config.users.map
        )
        if identity is None:
            # The library index lives in the ledger file; an in-memory ledger cannot share it.
            in_memory = str(config.ledger) == ":memory:"
            identity = (
                IdenticalIds() if in_memory else IndexedIdentity(config, self.ledger, self.clock)
            )
        self.identity: ItemIdentity = identity
        #: Tells a server that lost a user's data from that user's edits (jfsync.sync.resetguard).
        self.reset_guard = ResetGuard(ResetRule.from_config(config), self.ledger, self.clock)
        #: Catch-up, library refreshes and the periodic full reconcile (set up by start()).
        self.reconciler: Reconciler | None = None
        self._reconcile_options = reconcile_options or {}
        self.links: dict[str, ServerLink] = {}
        self.user_match: UserMatch | None = None
        self._subscriber_options = subscriber_options or {}
        self._pusher_options = pusher_options or {}
        self._session_options = session_options or {}
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self._match_lock = asyncio.Lock()
        #: User-matching problems already logged (a refresh logs only new ones).
        self._match_problems: set[str] = set()
        self._started_ms: int | None = None
        self._stopping = False
        #: Told (peer, propagation latency in s) after every successful write (metrics).
        self.write_observers: list[WriteHook] = []
        #: What every pusher reports of its writes goes to the observers and the activity feed.
        self._delivery = _DeliveryReport(self)
        #: When the last full reconcile finished (wall ms) and a one-line result, for status.
        self.last_reconcile_ms: int | None = None
        self.last_reconcile_result: str | None = None
        #: Why the service must stop at once (the ledger file was lost), and its signal.
        self.fatal_error: str | None = None
        self.fatal = asyncio.Event()
        self.ledger.file_lost_observers.append(self._ledger_file_lost)
        #: The last few hundred changes received and written (status, page, ``--activity``).
        self.activity = ActivityFeed()
        #: Live work first: catch-ups give way to events and deliveries (jfsync.sync.priority).
        self.live = LiveFirst(self.clock)
        #: Events, read-backs and playback reads become observations (jfsync.sync.intake).
        self.intake = self._make_intake()
        #: Notifications when something needs a person (``alerts:``; idle without targets).
        self._alert_options = alert_options or {}
        self.alerter = self._make_alerter(config)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the ledger, start every pusher, and bring every server up in the background."""
        if self._started_ms is None:  # a reload that re-creates the replicator keeps it
            self._started_ms = self.clock.wall_ms()
        await self.ledger.open()
        await self.reset_guard.load()
        await self._settle_outbox()
        self._session = aiohttp.ClientSession()
        for index, server in enumerate(self.config.servers):
            client = JellyfinClient.for_server(
                server, session=self._session, device_id=f"jfsync-rest-{server.name}"
            )
            pusher = Pusher(
                server.name,
                self.ledger,
                client,
                self.clock,
                on_progress=self._notify,
                on_regression=self._on_regression,
                watcher=self._delivery,
                ahead=self._apply_ahead,
                live=self.live,
                **self._pusher_options,
            )
            link = ServerLink(config=server, index=index, client=client, pusher=pusher)
            self.links[server.name] = link
        clients = {name: link.client for name, link in self.links.items()}
        await self.identity.start(clients)
        filtered = [s.name for s in self.config.servers if s.libraries is not None]
        if filtered and not isinstance(self.identity, IndexedIdentity):
            logger.warning(
                "library filters of %s are not applied: they need the library index, which "
                "lives in a ledger file (not :memory:)",
                ", ".join(filtered),
            )
        self.reconciler = Reconciler(
            self.ledger,
            self.identity,
            clients,
            self.clock,
            users=self._synced_users,
            interval_s=self.config.sync.reconcile_interval,
            on_applied=self._after_scan_apply,
            on_result=self._reconciled,
            guard=self.reset_guard,
            ahead=self._apply_ahead_of_user,
            live=self.live,
            **self._reconcile_options,
        )
        self.reconciler.start()
        self.alerter.start()
        for link in self.links.values():
            link.pusher.start()
            link.bring_up = asyncio.create_task(
                self._bring_up(link), name=f"jfsync-bring-up[{link.name}]"
            )
        logger.info(
            "jfsync %s started: servers %s, ledger %s",
            __version__,
            ", ".join(self.links),
            self.config.ledger,
        )

    async def stop(self) -> None:
        """Stop intake, let writes under way finish within the grace period, close everything.

        Every step runs even when one before it failed (the failure is logged): an error half
        way must not leave the ledger or the index open, nor the process unable to exit.
        """
        if self._stopping:
            return
        self._stopping = True
        links = list(self.links.values())
        await self._stop_step("alerts", self.alerter.stop())
        bring_ups = [link.bring_up for link in links if link.bring_up is not None]
        await self._stop_step("bring-up tasks", cancel_and_wait(bring_ups, logger))
        # Intake first: an event arriving later would find the identity index closed.
        subscribers = [sub for link in links for sub in link.subscribers.values()]
        await self._stop_step("subscribers", asyncio.gather(*(s.stop() for s in subscribers)))
        watchers = [link.sessions for link in links if link.sessions is not None]
        await self._stop_step("session watchers", asyncio.gather(*(w.stop() for w in watchers)))
        if self.reconciler is not None:
            await self._stop_step("reconciler", self.reconciler.close())
        grace = self.config.sync.shutdown_grace
        await self._stop_step("pushers", asyncio.gather(*(k.pusher.stop(grace) for k in links)))
        await self._stop_step("identity index", self.identity.close())
        clients = [link.client.close() for link in links]
        await self._stop_step("write lanes", asyncio.gather(*clients))
        if self._session is not None:
            await self._stop_step("HTTP session", self._session.close())
        try:
            depth = {name: await self.ledger.outbox_depth(name) for name in self.links}
        except JfsyncError as err:  # a ledger that never opened
            logger.debug("cannot count queued rows at stop: %s", err)
            depth = {}
        await self.ledger.close()
        logger.info(
            "jfsync stopped; rows still queued: %s",
            ", ".join(f"{k}={v}" for k, v in depth.items()) or "none",
        )

    @staticmethod
    async def _stop_step(name: str, step: Awaitable[object]) -> None:
        """Run one shutdown step; log its failure and go on (the caller's cancel passes)."""
        try:
            await step
        except Exception:
            logger.exception("stopping the %s failed; going on with the shutdown", name)

    def _make_alerter(self, config: Config) -> Alerter:
        return Alerter(
            config.alerts,
            self.status,
            **{"clock": self.clock, "secrets": config.secret_values(), **self._alert_options},
        )

    def _make_intake(self) -> Intake:
        return Intake(
            self.links,
            ledger=self.ledger,
            identity=self.identity,
            clock=self.clock,
            reset_guard=self.reset_guard,
            counters=self.counters,
            after_apply=self._after_apply,
            request_catch_up=self._on_regression,
            live=self.live,
        )

    async def _apply_ahead(self, keys: Sequence[tuple[str, str]]) -> None:
        """Apply events received of these keys but not applied yet (the intake of the day)."""
        await self.intake.apply_ahead(keys)

    async def _apply_ahead_of_user(self, user: str) -> None:
        """Apply the user's events received but not applied yet (the intake of the day)."""
        await self.intake.apply_ahead_of_user(user)

    async def __aenter__(self) -> SyncService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(
        self, predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float = 30.0
    ) -> None:
        """Wait until ``predicate`` holds, re-checking whenever jfsync applies or writes."""
        async with asyncio.timeout(timeout_s):
            while True:
                changed = self._changed
                result = predicate()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return
                await changed.wait()

    def _ledger_file_lost(self, reason: str) -> None:
        """The ledger takes no more writes (its file was deleted or replaced): stop, failing."""
        if self.fatal_error is not None:
            return
        self.fatal_error = reason
        logger.error("stopping: %s", reason)
        self.fatal.set()
        self._notify()

    async def wait_stop(self, stop: asyncio.Event) -> None:
        """Wait until ``stop`` is set (a signal) or the service must stop (:attr:`fatal`)."""
        waits = [
            asyncio.create_task(stop.wait(), name="jfsync-wait-stop"),
            asyncio.create_task(self.fatal.wait(), name="jfsync-wait-fatal"),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(waits, logger)

    # ------------------------------------------------------------------ servers and users

    async def _bring_up(self, link: ServerLink) -> None:
        """Bring the server up (retrying whatever fails), then keep its user list fresh."""
        await self._reach(link)
        self._follow_sessions(link)
        await self._keep_users_fresh(link)

    async def _reach(self, link: ServerLink) -> None:
        """Reach the server and subscribe its users, retrying forever on any failure.

        Every failure is shown as the server's ``last_error`` and logged once (repeats at
        DEBUG). Answers that need someone to act (a refused key, a Jellyfin too old to sync)
        are asked again every ``BRING_UP_SLOW_RETRY_S``, so a server upgraded from 10.8 is
        taken up without a restart; anything else (down, a proxy's 404 or page, a bug) backs
        off from 1 s to 60 s.
        """
        streak = FailureStreak(logger, link.name, self.clock)
        delays = backoff_delays(base_s=BRING_UP_INITIAL_S, cap_s=BRING_UP_MAX_S)
        while True:
            try:
                info = await link.client.ensure_supported()
                link.server_id = info.id
                link.version = info.version
                link.users = await link.client.users()
                link.users_refreshed_ms = self.clock.wall_ms()
                link.reachable = True
                link.last_error = None
                self.identity.server_reachable(link.name)
                await self._check_server_identity(link, info.id)
                if link.tokens is None:
                    assert link.server_id is not None
                    link.tokens = UserTokens(
                        link.client,
                        ServerTokenStore(self.ledger, link.name),
                        link.server_id,
                        link.config.users,
                        config_key=f"servers[{link.index}]",
                    )
                logger.info("[%s] Jellyfin %s, %d users", link.name, link.version, len(link.users))
                await self._rematch()
                break
            except Exception as err:  # noqa: BLE001 - logged by the streak, retried below
                link.reachable = False
                slow = isinstance(err, AuthRejectedError | UnsupportedServerError)
                delay = BRING_UP_SLOW_RETRY_S if slow else next(delays)
                link.last_error = f"{_describe(err)} (retrying in {delay:.0f} s)"
                if isinstance(err, UnsupportedServerError):
                    streak.failed("cannot sync this server", link.last_error)
                elif isinstance(err, AuthRejectedError):
                    # Reached, and it said no: the key, not the network, needs fixing.
                    link.last_error = (
                        f"the server refused the API key (HTTP {err.status}); set a valid "
                        f"admin key in servers[{link.index}].api_key (retrying in {delay:.0f} s)"
                    )
                    streak.failed("API key refused", link.last_error)
                elif isinstance(err, ServerError) and not isinstance(err, HttpStatusError):
                    streak.failed("cannot reach the server", link.last_error)
                elif isinstance(err, JfsyncError):
                    streak.failed("cannot bring the server up yet", link.last_error)
                else:
                    streak.failed(
                        f"bringing the server up failed unexpectedly; retrying in {delay:.0f} s",
                        err,
                        unexpected=True,
                    )
                self._notify()
                await self.clock.sleep(delay)
        streak.succeeded("server reachable")
        self._notify()

    async def _keep_users_fresh(self, link: ServerLink) -> None:
        """Read the server's user list again periodically and whenever asked; match again."""
        streak = FailureStreak(logger, link.name, self.clock)
        delays: Iterator[float] | None = None
        wait_s = self.config.sync.user_refresh_interval
        while True:
            await self._refresh_due(link, wait_s)
            interval = self.config.sync.user_refresh_interval  # a reload may have changed it
            try:
                users = await link.client.users()
                link.users = users
                link.users_refreshed_ms = self.clock.wall_ms()
                await self._rematch()
            except Exception as err:  # noqa: BLE001 - logged by the streak, retried below
                if delays is None:
                    delays = backoff_delays(base_s=BRING_UP_INITIAL_S, cap_s=BRING_UP_MAX_S)
                wait_s = min(interval, next(delays))
                link.last_error = f"reading the user list failed: {_describe(err)}"
                streak.failed(
                    f"reading the user list failed; retrying in {wait_s:.0f} s",
                    _describe(err) if isinstance(err, JfsyncError) else err,
                    unexpected=not isinstance(err, JfsyncError),
                )
                self._notify()
                continue
            if delays is not None:
                link.last_error = None
                streak.succeeded("user list read")
                self._notify()
            delays = None
            wait_s = interval

    async def _refresh_due(self, link: ServerLink, seconds: float) -> None:
        """Wait ``seconds``, or less when a refresh of this server's users is asked for."""
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        asked = asyncio.ensure_future(link.refresh_users.wait())
        try:
            await asyncio.wait({sleeper, asked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, asked):
                fut.cancel()
            await asyncio.gather(sleeper, asked, return_exceptions=True)
        link.refresh_users.clear()

    async def _rematch(self) -> None:
        """Match users over every server that answered; subscribe the newly matched and stop
        the subscribers of accounts no longer synced (removed, disabled, excluded, renamed)."""
        async with self._match_lock:
            users = {n: link.users for n, link in self.links.items() if link.users is not None}
            match = match_users(self.config, users)
            self.user_match = match
            await self._apply_policy()  # issue 14: each person's register choices
            for problem in match.problems:
                if problem not in self._match_problems:
                    self._match_problems.add(problem)
                    logger.warning("users: %s", problem)
            for link in self.links.values():
                if link.users is None or link.tokens is None:
                    continue
                wanted = {
                    account.id: (person.key, account)
                    for person, account in match.for_server(link.name)
                }
                for user_id, key in list(link.user_keys.items()):
                    if wanted.get(user_id, (None,))[0] != key:
                        await self._unsubscribe(link, user_id, key)
                for user_id, (key, account) in wanted.items():
                    if user_id in link.user_keys:
                        continue
                    await self.ledger.map_user(link.name, account.id, key, name=account.name)
                    link.user_keys[user_id] = key
                    self.activity.user_names.setdefault(key, account.name)
                    logger.info("[%s] syncing account %s as %s", link.name, account.name, key)
                    self._subscribe(link, account, key)

    async def _unsubscribe(self, link: ServerLink, user_id: str, key: str) -> None:
        """Stop syncing an account that is no longer matched."""
        link.user_keys.pop(user_id, None)
        subscriber = link.subscribers.pop(user_id, None)
        name = subscriber.user_name if subscriber is not None else user_id
        logger.warning(
            "[%s] account %s (%s) is no longer synced (removed, disabled, excluded or no "
            "longer matched); its subscriber is stopped",
            link.name,
            name,
            key,
        )
        if subscriber is not None:
            await subscriber.stop()
        self._notify()

    def _subscribe(self, link: ServerLink, account: UserDto, key: str) -> None:
        tokens = link.tokens
        assert tokens is not None
        assert link.server_id is not None
        user_id, user_name = account.id, account.name

        async def get_token(refresh: bool) -> str:
            return await tokens.token_for(user_id, user_name, refresh=refresh)

        async def resync() -> None:
            await self._resync(link, user_id, key)

        subscriber = Subscriber(
            link.name,
            link.config.url,
            user_id,
            user_name,
            user_device_id(link.server_id, user_id),
            get_token=get_token,
            on_event=self._on_event,
            resync=resync,
            clock=self.clock,
            max_message_bytes=link.config.max_message_size,
            **self._subscriber_options,
        )
        link.subscribers[user_id] = subscriber
        subscriber.start()

    # ------------------------------------------------------------------ intake

    async def _on_event(self, event: SubscriberEvent) -> None:
        if isinstance(event, UserDataChangedEvent):
            await self.intake.user_data(event)
        elif isinstance(event, LibraryChangedEvent):
            if self.reconciler is not None:
                self.reconciler.library_changed(event)
        elif isinstance(event, ConnectionStateChanged):
            link = self.links.get(event.server)
            subscriber = link.subscribers.get(event.user_id) if link is not None else None
            if (
                link is not None
                and subscriber is not None
                and event.state is SubscriberState.CONNECTED
                and subscriber.status.reconnect_count > 0
            ):
                # The server may have been down or restored: its accounts may have changed.
                link.refresh_users.set()
            self._notify()

    # ------------------------------------------------------------------ playback sessions

    def _follow_sessions(self, link: ServerLink) -> None:
        """Start following the server's playback sessions (jfsync.sync.sessions), if enabled."""
        sync = self.config.sync
        if not sync.follow_sessions or link.sessions is not None:
            return
        assert link.config.api_key is not None
        link.sessions = SessionWatcher(
            link.name,
            link.config.url,
            link.client,
            api_key=link.config.api_key.get_secret_value(),
            version=parse_version(link.version or ""),
            clock=self.clock,
            on_reads=self.intake.read_playing,
            quiet_s=sync.session_quiet,
            live_progress_s=sync.live_progress,
            **self._session_options,
        )
        link.sessions.start()

    async def _resync(self, link: ServerLink, remote_user_id: str, user: str) -> None:
        """Catch up with what the socket of this user may have missed."""
        assert self.reconciler is not None
        # After a restart, writes cut off by the stop must be recognised before a scan of
        # that server could read them as the user's changes.
        if not await link.pusher.wait_recovered(RECOVERY_WAIT_S):
            logger.warning(
                "[%s] catching up before interrupted writes could be checked (peer busy)",
                link.name,
            )
        # Echoes due on the old socket will never arrive; left pending they would swallow a
        # user who sets the state back (taken for a stale event) for up to a minute.
        await self.ledger.forget_echoes(link.name, user)
        result = await self.reconciler.catch_up(link.name, remote_user_id, user)
        self.counters.scans += 1
        self.counters.scan_changes += result.changed
        link.pusher.wake()
        logger.info(
            "[%s] caught up user %s: %d non-default items, %d differed from the ledger",
            link.name,
            user,
            result.scanned,
            result.observations,
        )

    async def _check_server_identity(self, link: ServerLink, jellyfin_id: str | None) -> None:
        """Forget the history of a server whose Jellyfin id changed under its config name.

        A different server id is a different server (a reinstall, another machine behind the
        URL): what jfsync knew it to hold says nothing about what it holds now, and diffing
        against it would take every difference for the user's edit. Its last-known states,
        echoes and reset holds are dropped, so everything it shows is a first contact, merged
        by the first-contact rules (favourite OR, later play wins, ...), never a mass edit.
        """
        if not jellyfin_id:
            return
        before = await self.ledger.jellyfin_id(link.name)
        if before == jellyfin_id:
            return
        if before is not None:
            dropped = await self.ledger.forget_server_history(link.name)
            self.reset_guard.forget_server(link.name)
            logger.warning(
                "[%s] the Jellyfin server id changed (%s -> %s): a new server under this name; "
                "forgot what jfsync knew it to hold (%d states); its data is merged with the "
                "others by the first-contact rules, not taken as edits",
                link.name,
                before,
                jellyfin_id,
                dropped,
            )
        await self.ledger.remember_jellyfin_id(link.name, jellyfin_id)

    async def accept_reset(
        self, server: str, user: str | None, *, restore: bool = False
    ) -> dict[str, Any]:
        """Resolve reset holds of ``server`` (one user, or all): accept its state, or restore.

        The decision is stored, then applied at once by a catch-up of each held user whose
        socket is up (else by the next one). Returns ``{"resolved": [...], "applied": [...],
        "pending": [...]}`` (lines describing each hold).
        """
        resolution: Literal["accept", "restore"] = "restore" if restore else "accept"
        holds = await self.ledger.resolve_reset_holds(server, user, resolution)
        link = self.links.get(server)
        applied: list[str] = []
        pending: list[str] = []
        for hold in holds:
            remote = next(
                (r for r, k in (link.user_keys if link else {}).items() if k == hold.user), None
            )
            if link is None or remote is None or self.reconciler is None or not link.reachable:
                pending.append(describe_hold(hold))
                continue
            try:
                await self._resync(link, remote, hold.user)
            except ServerError as err:
                pending.append(f"{describe_hold(hold)} ({err})")
                continue
            applied.append(describe_hold(hold))
        return {
            "resolved": [describe_hold(h) for h in holds],
            "applied": applied,
            "pending": pending,
        }

    def _synced_users(self) -> dict[str, dict[str, str]]:
        """server -> remote user id -> canonical user, for every reachable server."""
        return {
            name: dict(link.user_keys)
            for name, link in self.links.items()
            if link.reachable and link.user_keys
        }

    def _reconciled(self, report: ReconcileReport) -> None:
        self.last_reconcile_ms = report.finished_ms
        self.last_reconcile_result = report.summary()
        self._notify()

    def _after_scan_apply(self, applied: list[Applied]) -> None:
        """:meth:`_after_apply` for what a catch-up applied (no live change: its deliveries
        do not make other catch-ups give way)."""
        self._after_apply(applied, live=False)

    def _after_apply(self, applied: list[Applied], *, live: bool = True) -> None:
        for result in applied:
            if result.outcome is Outcome.ECHO:
                self.counters.echoes += 1
            elif result.outcome is Outcome.CHANGED:
                self.counters.changes_applied += 1
                obs = result.observation
                self.activity.record_change(
                    at_ms=obs.wall_ms,
                    server=obs.server,
                    user=obs.user,
                    item=obs.item,
                    kind=obs.source,
                    registers=result.changed,
                    owed=result.queued,
                )
        wake_peers(applied, {name: link.pusher for name, link in self.links.items()}, live=live)
        self._notify()

    def _on_regression(self, server: str, user: str) -> None:
        """Catch ``user`` up on ``server``: items of it read back to never-touched, or changes
        received from it that could not be applied."""
        link = self.links.get(server)
        if self.reconciler is None or link is None:
            return
        remote = next((r for r, key in link.user_keys.items() if key == user), None)
        if remote is not None:
            self.reconciler.request_user_catch_up(server, remote, user)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ------------------------------------------------------------------ issue 14: live config

    def merge_policy(self) -> MergePolicy:
        """The merge policy of the running config and the people matched so far."""
        policy = MergePolicy.from_config(self.config)
        if self.user_match is not None:
            policy = policy.with_user_fields(person_fields(self.config, self.user_match))
        return policy

    async def _apply_policy(self) -> None:
        """Give the ledger the current merge policy when it changed; settle queued rows."""
        policy = self.merge_policy()
        if policy == self.ledger.policy:
            return
        before = self.ledger.policy
        await self.ledger.set_policy(policy)
        await self._settle_outbox()
        await self._now_receiving(before)

    async def _now_receiving(self, before: MergePolicy) -> None:
        """A server that only sent and now receives is owed what it missed meanwhile."""
        policy = self.ledger.policy
        for name in sorted(before.send_only - policy.send_only):
            if name not in policy.servers:
                continue
            now_ms = self.clock.wall_ms()
            queued = await self.ledger.requeue_differences(name, now_ms)
            link = self.links.get(name)
            for user in sorted(set(link.user_keys.values()) if link is not None else ()):
                # ... and what it has no history of (as a server met for the first time).
                if self.identity.complete:
                    queued += await self.ledger.backfill_mapped(name, user, now_ms)
                else:
                    queued += await self.ledger.backfill(name, user, now_ms)
            logger.info("[%s] receives again: %d items queued for it", name, queued)
            if link is not None:
                link.pusher.wake()

    async def _settle_outbox(self) -> None:
        """Drop queued rows the policy no longer allows (with a log line), remember servers
        taken out of the config, and queue for servers back in it what they missed."""
        away = await self.ledger.mark_away()
        for peer, count in sorted((await self.ledger.prune_outbox()).items()):
            why = (
                "no longer in the config"
                if peer in away or peer not in self.ledger.policy.servers
                else "mode: send, or registers no longer synced"
            )
            logger.warning("[%s] dropped %d queued writes (%s)", peer, count, why)
        for name in await self.ledger.rejoined():
            queued = await self.ledger.requeue_differences(name, self.clock.wall_ms())
            logger.info(
                "[%s] back in the config: %d items that changed meanwhile queued for it",
                name,
                queued,
            )
        self._notify()

    async def reconfigure(self, new: Config) -> list[str]:
        """Apply a validated config to the running service; return what changed, one line each.

        See :mod:`jfsync.reload` for what each change does. The ledger path and the status
        endpoint are kept (they are only read at start); a change to them is reported.
        """
        async with self._reload_lock:
            old = self.config
            diff = diff_configs(old, new)
            kept = new.model_copy(update={"ledger": old.ledger, "status": old.status})
            lines = list(diff.lines)
            if diff.needs_restart:
                lines.append(restart_note(diff.needs_restart))
                logger.warning("config reload: %s", restart_note(diff.needs_restart))
            if self.config_status is not None:
                self.config_status["pending_restart"] = list(diff.needs_restart)
            if diff.empty:
                self.config = kept
                return lines
            if diff.rebuild:
                before = self.ledger.policy
                try:
                    await self._rebuild(kept)
                except Exception:
                    # Never left stopped: back to the config that ran, then say what failed.
                    logger.exception("config reload: starting with the new config failed")
                    await self._rebuild(old)
                    raise
                await self._now_receiving(before)
                return lines
            self.config = kept
            if diff.users:
                await self._rematch()  # opens and closes sockets; applies the policy
            else:
                await self._apply_policy()
            if diff.filters:
                await self._apply_filters(diff.filters)
            if diff.intervals and self.reconciler is not None:
                self.reconciler.set_interval(kept.sync.reconcile_interval)
                for link in self.links.values():
                    link.refresh_users.set()  # the new user refresh period starts now
            for link in self.links.values():
                link.config = kept.server(link.name)
                link.pusher.wake()
            if diff.sessions:
                await self._refollow_sessions()
            if diff.alerts:
                await self._renew_alerter()
            self._notify()
            return lines

    async def _refollow_sessions(self) -> None:
        """Follow every reachable server's playback sessions again, with the new settings."""
        for link in self.links.values():
            watcher, link.sessions = link.sessions, None
            if watcher is not None:
                await watcher.stop()
            if link.reachable:
                self._follow_sessions(link)

    async def _renew_alerter(self) -> None:
        """Notify through the new ``alerts`` section (incidents open now are told again)."""
        await self.alerter.stop()
        self.alerter = self._make_alerter(self.config)
        self.alerter.start()

    async def _apply_filters(self, servers: Sequence[str]) -> None:
        """Rescan the libraries of servers whose filter changed; drop what they left out."""
        if not isinstance(self.identity, IndexedIdentity):
            logger.warning(
                "library filters need the library index (a ledger file); not applied to %s",
                ", ".join(servers),
            )
            return
        self.identity.index.set_servers(self.config.servers)
        change = await self.identity.refresh(list(servers))
        for name in servers:
            # Items brought back in are owed what changed while they were left out.
            await self.ledger.requeue_differences(name, self.clock.wall_ms())
            dropped = await self.ledger.drop_unmapped_rows(name)
            if dropped:
                logger.warning(
                    "[%s] dropped %d queued writes of items its library filter leaves out",
                    name,
                    dropped,
                )
        # Catch up now whatever the filter brought in (or the match moved).
        for name in sorted(change.servers | set(servers)):
            link = self.links.get(name)
            if link is None or not link.reachable:
                continue
            for remote, user in sorted(link.user_keys.items()):
                try:
                    await self._resync(link, remote, user)
                except ServerError as err:
                    logger.warning("[%s] catch-up of user %s failed: %s", name, user, err)

    async def _rebuild(self, config: Config) -> None:
        """Re-create the replicator for a new server list: stop everything (the ledger is
        durable: nothing queued is lost), then start again with ``config``."""
        logger.info("config reload: servers changed; reconnecting every server")
        await self.stop()
        self.config = config
        self.ledger = Ledger(
            config.ledger, MergePolicy.from_config(config), user_map=config.users.map
        )
        self.ledger.file_lost_observers.append(self._ledger_file_lost)
        if self._own_identity:
            in_memory = str(config.ledger) == ":memory:"
            self.identity = (
                IdenticalIds() if in_memory else IndexedIdentity(config, self.ledger, self.clock)
            )
        self.reset_guard = ResetGuard(ResetRule.from_config(config), self.ledger, self.clock)
        self.alerter = self._make_alerter(config)
        self.reconciler = None
        self.links = {}
        self.intake = self._make_intake()
        self.user_match = None
        self._session = None
        self._match_problems = set()
        self._stopping = False
        await self.start()

    # ------------------------------------------------------------------ status

    @property
    def started_ms(self) -> int | None:
        """When start() began (wall ms), or None before."""
        return self._started_ms

    def identity_status(self) -> dict[str, Any]:
        """Item matching counts per server pair (:func:`jfsync.ops.snapshot.identity_status`)."""
        return snapshot.identity_status(self)

    def identity_details(self) -> dict[str, Any]:
        """Everything about item matching and reconciles (:func:`.snapshot.identity_details`)."""
        return snapshot.identity_details(self)

    async def status(self) -> dict[str, Any]:
        """A secret-free snapshot of servers, sockets and peers (the status endpoint's body)."""
        return await snapshot.build_status(self)


def wake_peers(applied: Sequence[Applied], pushers: Mapping[str, Pusher], *, live: bool) -> None:
    """Wake the pushers of the peers whose outbox rows ``applied`` changed.

    A peer now owed a write is woken to write it (with ``live``, as live work). A peer whose
    row was emptied (what it held is no longer owed) is woken too, though nothing is due: its
    pusher may have compared that row ahead already, and a wake makes it compare the rows
    again before it writes, so the peer is never sent the value nobody wants any more.
    Each pusher is told which keys changed (a batch it compared ahead is compared again
    only if it holds one of them).
    """
    touched: dict[str, list[tuple[str, str]]] = {}
    owed: set[str] = set()
    for result in applied:
        if not result.queued:
            continue
        key = (result.observation.user, result.observation.item)
        for peer, registers in result.queued.items():
            touched.setdefault(peer, []).append(key)
            if registers:
                owed.add(peer)
    for peer, keys in touched.items():
        pusher = pushers.get(peer)
        if pusher is not None:
            pusher.wake(live=live and peer in owed, keys=keys)


def _describe(err: BaseException) -> str:
    """Text for status and logs: jfsync's own errors as they are (without the ``[server] ``
    prefix: the line or entry names the server already), others with their type."""
    if isinstance(err, ServerError):
        text, prefix = str(err), f"[{err.server}] "
        return text[len(prefix) :] if text.startswith(prefix) else text
    if isinstance(err, JfsyncError):
        return str(err)
    return f"unexpected error: {type(err).__name__}: {err}"
