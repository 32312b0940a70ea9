"""Catch-up, library refreshes and the full reconcile (periodic, and for ``jfsync reconcile``).

:meth:`Reconciler.catch_up` is what jfsync does for one (server, user) after every (re)connect
and in every full reconcile: list the user's items with non-default data on that server
(:func:`jfsync.sync.catchup.scan_non_default`), map them through the identity, diff them against the
ledger's last-known states and apply the differences through the ledger's one merge path
(source ``scan``). A known non-default item missing from the listing is re-read by id first:
if the server still has it, the state read (usually the default: a reset) is the observation;
if it is gone (removed, moved), nothing is observed, so a deleted file never un-plays or
un-favourites an item elsewhere. Then every non-default canonical item the server has but has
no history of is queued for it (first-contact merge at write time). Every ledger call of a
catch-up is short (a page of last-known states, a slice of observations, a range of the
backfill; smaller while live events flow), and between two of them it gives way to the live
work under way (:mod:`jfsync.sync.priority`).

With a reset guard (:mod:`jfsync.sync.resetguard`), a scan showing the user's data on that server
regressed wholesale to defaults is a server that lost its data: the regressed items are
restored from the canonical state instead of propagated (``restore``), or the whole (server,
user) is held for the operator (``hold``); a held pair is not caught up until resolved.

:class:`Reconciler` also owns two background tasks in the service: the periodic full reconcile
(``sync.reconcile_interval``, on the injected clock: rescan every library, match again, catch up
every user of every reachable server) and the debounced ``LibraryChanged`` refresh (re-read the
items named, match again, catch up the servers whose id map moved).

``jfsync reconcile`` (:mod:`jfsync.ops.reconcilecmd`) runs one :meth:`Reconciler.reconcile`
and then delivers what it queued through the pushers, the only delivery path
(:mod:`jfsync.sync.delivery`); :class:`ReconcileReport` is what both it and the service show.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jfsync.errors import JfsyncError, ServerError
from jfsync.jellyfin.api import JellyfinClient
from jfsync.model import UserData
from jfsync.sync.catchup import (
    DIFF_STEP,
    PASS_STEP,
    catchup_observations_in_steps,
    in_steps,
    scan_non_default,
)
from jfsync.sync.identity import IdentityChange, IndexedIdentity, ItemIdentity
from jfsync.sync.ledger import Applied, ItemMapping, Ledger, Outcome
from jfsync.sync.priority import LiveFirst
from jfsync.sync.resetguard import ResetGuard, regressed_items
from jfsync.sync.subscriber import LibraryChangedEvent
from jfsync.tasks import cancel_and_wait
from jfsync.timing import Clock

logger = logging.getLogger(__name__)

#: Observations applied per ledger transaction during a catch-up while no live event flows.
#: The ledger's lock is FIFO: an event arriving meanwhile waits for at most one such
#: transaction (10-25 ms at 250 on a busy 2-core machine).
SCAN_BATCH = 250
#: Observations per transaction while live events flow (:mod:`jfsync.sync.priority`): an
#: event's apply, and each of its pusher's ledger calls, waits for at most one such
#: transaction (1-3 ms at 32), and the live work under way goes before the next one. Not
#: fewer: a transaction of 16 took as long as one of 32 (1.3 ms, mostly the transaction
#: itself), and a catch-up of 20,000 first contacts gave way twice as often.
LIVE_SCAN_BATCH = 32
#: Items of a scan mapped to canonical keys per call while live events flow (the live
#: work under way goes between two calls).
LIVE_MAP_STEP = 200
#: Items per listing page of a catch-up scan, and while events flow. A page is validated in
#: one go on the event loop (ids and user data only, about 0.3 ms per 100 items on a busy
#: 2-core machine, :meth:`~jfsync.jellyfin.api.JellyfinClient.iter_user_data`).
SCAN_PAGE = 1000
LIVE_SCAN_PAGE = 100
#: Last-known states read per ledger call, and canonical items a backfill covers per
#: transaction, while no live event flows: a few milliseconds each at most.
READ_PAGE = 5000
#: The same while live events flow: one page is well under a millisecond of the ledger's
#: thread, which is what a live event's apply can wait for; the live work under way goes
#: between two pages.
LIVE_READ_PAGE = 250
#: Quiet time after a ``LibraryChanged`` before the index is refreshed.
LIBRARY_DEBOUNCE_S = 2.0
#: More changed ids than this in one refresh: rescan the whole library instead.
FULL_RESCAN_OVER = 5000

#: server -> remote user id -> canonical user key, for the users to catch up.
UsersOf = Callable[[], Mapping[str, Mapping[str, str]]]
AppliedHook = Callable[[list[Applied]], None]
ResultHook = Callable[["ReconcileReport"], None]
#: Applies what was received of a user and not applied yet (the intake's
#: :meth:`~jfsync.sync.intake.Intake.apply_ahead_of_user`).
AheadHook = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CatchUpResult:
    """What one catch-up of one user on one server found."""

    server: str
    user: str
    scanned: int
    observations: int
    changed: int
    resets: int
    gone: int
    queued: int
    #: Items the reset guard restored (not propagated), or held (nothing applied).
    guarded: int = 0
    #: The pair is held by the reset guard: nothing was applied.
    held: bool = False


@dataclass(slots=True)
class ReconcileReport:
    """What a full reconcile did."""

    started_ms: int
    finished_ms: int = 0
    identity: IdentityChange = field(default_factory=IdentityChange)
    results: list[CatchUpResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        """Observations that changed something, over every server and user."""
        return sum(r.changed for r in self.results)

    def summary(self) -> str:
        """One line for logs and the status page."""
        servers = len({r.server for r in self.results})
        users = len({r.user for r in self.results})
        text = (
            f"{servers} servers, {users} users checked: {self.changed} changes found, "
            f"{sum(r.queued for r in self.results)} items queued"
        )
        if self.errors:
            text += f"; {len(self.errors)} errors ({self.errors[0]})"
        return text


class Reconciler:
    """Catch-up, library refreshes and full reconciles over one ledger and identity."""

    def __init__(
        self,
        ledger: Ledger,
        identity: ItemIdentity,
        clients: Mapping[str, JellyfinClient],
        clock: Clock,
        *,
        users: UsersOf,
        interval_s: float | None = None,
        library_debounce_s: float = LIBRARY_DEBOUNCE_S,
        on_applied: AppliedHook | None = None,
        on_result: ResultHook | None = None,
        guard: ResetGuard | None = None,
        ahead: AheadHook | None = None,
        live: LiveFirst | None = None,
    ) -> None:
        self.ledger = ledger
        #: Live work first: while events flow, a catch-up gives way to the events and
        #: deliveries under way between its steps, and applies small transactions.
        self._live = live
        #: Called before a catch-up asks for its scan: events of that user received earlier
        #: (a bulk message still being applied in slices) must land before the scan.
        self._ahead = ahead
        #: Tells a server that lost a user's data from the user's edits (None: no guard).
        self.guard = guard
        self.identity = identity
        self.clients = dict(clients)
        self.clock = clock
        self._users = users
        self._interval_s = interval_s
        self._debounce_s = library_debounce_s
        self._on_applied = on_applied
        self._on_result = on_result
        self._lock = asyncio.Lock()
        self._changed: dict[str, set[str]] = {}
        self._removed: dict[str, set[str]] = {}
        self._catch_up_due: set[str] = set()
        #: (server, remote user id, user) asked for by the pusher (items read as reset).
        self._users_due: set[tuple[str, str, str]] = set()
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.last_report: ReconcileReport | None = None
        self.library_refreshes = 0

    def __repr__(self) -> str:
        return f"<Reconciler servers={list(self.clients)}>"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the periodic reconcile (when an interval is set) and the library refresher."""
        if self._tasks:
            return
        if isinstance(self.identity, IndexedIdentity):
            self.identity.on_unknown = self.request_refresh
            self.identity.on_change = self.request_catch_up
        self._tasks.append(asyncio.create_task(self._library_loop(), name="jfsync-library-refresh"))
        if self._interval_s is not None:
            self._tasks.append(asyncio.create_task(self._periodic(), name="jfsync-reconcile"))

    def set_interval(self, interval_s: float | None) -> None:
        """Take a new ``sync.reconcile_interval`` (a config reload): the next full reconcile
        comes that long from now."""
        self._interval_s = interval_s
        if not self._tasks:
            return  # not started: start() reads it
        for task in [t for t in self._tasks if t.get_name() == "jfsync-reconcile"]:
            task.cancel()
            self._tasks.remove(task)
        if interval_s is not None:
            self._tasks.append(asyncio.create_task(self._periodic(), name="jfsync-reconcile"))

    async def close(self) -> None:
        """Cancel the background tasks and wait for them."""
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks, logger)

    # ------------------------------------------------------------------ catch-up

    async def catch_up(self, server: str, remote_user_id: str, user: str) -> CatchUpResult:
        """Scan the user's non-default items on ``server``, diff, apply, queue what it lacks."""
        client = self.clients[server]
        ledger = self.ledger
        guard = self.guard
        hold = await guard.hold_of(server, user) if guard is not None else None
        if hold is not None and hold.resolution is None:
            logger.info(
                "[%s] user %s is held by the reset guard; not caught up (jfsync accept-reset)",
                server,
                user,
            )
            return CatchUpResult(server, user, 0, 0, 0, 0, 0, 0, hold.items, held=True)
        if self._ahead is not None:
            await self._ahead(user)
        # Observations carry the time the scan was REQUESTED: the echo rule only matches a
        # page against writes recorded after it was asked for (a page asked for earlier may
        # predate a write that was recorded while the scan ran).
        read_ms = self.clock.wall_ms()
        read_seq = ledger.ticket()
        # Issue 14: a server with a library filter is listed library by library.
        parents = (
            await self.identity.index.library_parents(client, server)
            if isinstance(self.identity, IndexedIdentity)
            else None
        )
        # An identity that maps every item (the library index) needs only the ids and the
        # user's data of what the server lists; the others learn the items from the scan.
        lazy = not self.identity.complete
        scan = await scan_non_default(
            client,
            remote_user_id,
            parents,
            details=lazy,
            pause=self._step,
            page_size=self._scan_page,
        )
        scanned = scan.states
        items = await self._canonical_items(server, list(scanned))
        if lazy:
            # Identities that map lazily learn the server's ids from what it shows.
            await ledger.map_items(
                server,
                [
                    ItemMapping(
                        remote_id=remote,
                        item=items[remote],
                        item_type=found.type,
                        path=found.path,
                        provider_ids=dict(found.provider_ids) or None,
                    )
                    for remote, found in scan.items.items()
                    if remote in items
                ],
            )
            scan.items.clear()
        # The whole-user passes below go a step at a time while events flow (a user with
        # 20,000 items of data made each one 5-20 ms long), and give the loop a turn between
        # them otherwise (together they held it for up to 100 ms at 200,000 items). The size
        # of each step is decided as it starts: events that begin to flow mid-pass must not
        # wait for a step sized for a quiet loop.
        step = self._pass_step
        states: dict[str, UserData] = {}
        async for scan_part in in_steps(scanned.items(), self._step, step):
            for remote, data in scan_part:
                key = items.get(remote)
                if key is not None:
                    states[key] = data
        await self._step()
        known = await self._last_known(server, user)
        await asyncio.sleep(0)
        missing: list[str] = []
        async for known_part in in_steps(known.items(), self._step, step):
            missing += [k for k, s in known_part if k not in states and not s.is_default]
        gone: set[str] = set()
        if missing:
            still = await self._read_by_key(client, server, remote_user_id, missing)
            gone = set(missing) - set(still)
            states.update(still)
            resets = sum(1 for k in still if still[k].is_default)
        else:
            resets = 0
        known_here = {k: v for k, v in known.items() if k not in gone} if gone else known
        lost: dict[str, UserData] = {}
        non_default = 0
        if guard is not None:
            synced = tuple(ledger.policy.synced)
            regressed: list[str] = []
            async for state_part in in_steps(states.items(), self._step, step):
                regressed += regressed_items(known_here, dict(state_part), synced)
            regressed.sort()
            async for value_part in in_steps(known_here.values(), self._step, step):
                non_default += sum(1 for v in value_part if v.holds_data(synced))
            if hold is not None:
                # The operator decided: "accept" propagates everything below; "restore"
                # restores every regressed item whatever the rule says.
                fires = hold.resolution == "restore" and bool(regressed)
            else:
                fires = guard.rule.fires(len(regressed), non_default)
            if fires and hold is None and guard.rule.mode == "hold":
                await guard.hold(server, user, len(regressed), non_default)
                return CatchUpResult(
                    server, user, len(states), 0, 0, 0, len(gone), 0, len(regressed), held=True
                )
            if fires:
                lost = {k: states.pop(k) for k in regressed}
                known_here = {k: v for k, v in known_here.items() if k not in lost}
        observations = await catchup_observations_in_steps(
            server, user, states, known_here, read_ms, read_seq, step=step, pause=self._step
        )
        changed = 0
        start = 0
        while start < len(observations):
            await self._step()
            size = LIVE_SCAN_BATCH if self._flowing() else SCAN_BATCH
            applied = await ledger.apply_observations(observations[start : start + size])
            start += size
            changed += sum(a.outcome is Outcome.CHANGED for a in applied)
            if self._on_applied is not None:
                self._on_applied(applied)
        restored = await ledger.rebase_last_known(server, user, lost, read_ms) if lost else 0
        await self._step()
        queued = await self._backfill(server, user)
        if (queued or restored) and self._on_applied is not None:
            self._on_applied([])
        if guard is not None and hold is not None:
            await guard.resolved(
                server,
                user,
                hold.resolution or "accept",
                restored if lost else sum(1 for o in observations if o.state.is_default),
            )
        elif guard is not None and lost:
            guard.restored(server, user, len(lost), non_default, restored)
        if gone:
            logger.info(
                "[%s] %d items user %s had data for are gone from the server; not a reset",
                server,
                len(gone),
                user,
            )
        return CatchUpResult(
            server,
            user,
            len(states) + len(lost),
            len(observations),
            changed,
            resets,
            len(gone),
            queued + restored,
            len(lost),
        )

    async def _step(self) -> None:
        """Give way to live work between two steps of a catch-up (:mod:`jfsync.sync.priority`);
        without a live-first policy, give the event loop one turn."""
        if self._live is not None and self._live.flowing():
            await self._live.step()
        else:
            await asyncio.sleep(0)

    def _flowing(self) -> bool:
        """Tell whether live events flow now (a catch-up then goes in smaller steps)."""
        return self._live is not None and self._live.flowing()

    def _pass_step(self) -> int:
        """Items of a whole-user pass worked on now before the next give-way
        (:data:`~jfsync.sync.catchup.PASS_STEP` while live events flow, else
        :data:`~jfsync.sync.catchup.DIFF_STEP`)."""
        return PASS_STEP if self._flowing() else DIFF_STEP

    def _scan_page(self) -> int:
        """Items per listing page of a catch-up scan now (:data:`SCAN_PAGE`, or
        :data:`LIVE_SCAN_PAGE` while live events flow)."""
        return LIVE_SCAN_PAGE if self._flowing() else SCAN_PAGE

    def _page(self) -> int:
        """How much one paged ledger call of a catch-up covers now (:data:`READ_PAGE`, or
        :data:`LIVE_READ_PAGE` while live events flow)."""
        return LIVE_READ_PAGE if self._flowing() else READ_PAGE

    async def _last_known(self, server: str, user: str) -> dict[str, UserData]:
        """Every last-known state of ``user`` on ``server``, read a page per ledger call.

        An event applied between two pages is safe either way: a page read before it holds
        the older state, and the scan's observation of that item (older than the event: its
        ``read_seq`` was taken before the scan) is not applied over it.
        """
        known: dict[str, UserData] = {}
        after = 0
        while True:
            page, cursor = await self.ledger.last_known_page(server, user, after, self._page())
            known.update(page)
            if cursor is None:
                return known
            after = cursor
            await self._step()

    async def _backfill(self, server: str, user: str) -> int:
        """Queue for ``server`` what it has no history of (only the items it maps, with an
        identity that maps every item), a range of the user's items per transaction; return
        the rows touched."""
        wall_ms = self.clock.wall_ms()
        only_mapped = self.identity.complete
        queued = 0
        after = 0
        while True:
            touched, cursor = await self.ledger.backfill_page(
                server, user, wall_ms, after, self._page(), only_mapped=only_mapped
            )
            queued += touched
            if cursor is None:
                return queued
            after = cursor
            await self._step()

    async def _canonical_items(self, server: str, remote_ids: list[str]) -> dict[str, str]:
        """The identity's canonical keys of a scan's items; while events flow, in steps."""
        if not self._flowing():
            return await self.identity.canonical_items(server, remote_ids)
        found: dict[str, str] = {}
        for start in range(0, len(remote_ids), LIVE_MAP_STEP):
            if start:
                await self._step()
            found.update(
                await self.identity.canonical_items(
                    server, remote_ids[start : start + LIVE_MAP_STEP]
                )
            )
        return found

    async def _read_by_key(
        self, client: JellyfinClient, server: str, remote_user_id: str, keys: Sequence[str]
    ) -> dict[str, UserData]:
        """Read the user's current data of some canonical items the server has, by key."""
        remote = await self.identity.remote_items(server, keys)
        by_remote = {r: k for k, r in remote.items()}
        found: dict[str, UserData] = {}
        if not by_remote:
            return found
        async for item in client.iter_items(
            remote_user_id, ids=list(by_remote), fields=(), include_types=(), recursive=True
        ):
            key = by_remote.get(item.id)
            if key is not None and item.user_data is not None:
                found[key] = item.user_data.to_user_data()
        return found

    # ------------------------------------------------------------------ full reconcile

    async def reconcile(self, servers: Iterable[str] | None = None) -> ReconcileReport:
        """Rescan every library, match again, then catch up every user of every server.

        Only servers listed by ``users()`` (the reachable ones) are caught up; a server that
        fails is reported and the others go on.
        """
        async with self._lock:
            report = ReconcileReport(started_ms=self.clock.wall_ms())
            users = {s: dict(u) for s, u in self._users().items()}
            names = [s for s in (servers or self.clients) if s in users]
            try:
                report.identity = await self.identity.refresh(names)
            except JfsyncError as err:
                report.errors.append(f"matching: {err}")
            for server in names:
                for remote_user_id, user in users[server].items():
                    try:
                        report.results.append(await self.catch_up(server, remote_user_id, user))
                    except ServerError as err:
                        report.errors.append(str(err))
                        logger.warning("[%s] reconcile of user %s failed: %s", server, user, err)
            report.finished_ms = self.clock.wall_ms()
        self.last_report = report
        logger.info("full reconcile: %s", report.summary())
        if self._on_result is not None:
            self._on_result(report)
        return report

    async def _periodic(self) -> None:
        assert self._interval_s is not None
        while True:
            await self.clock.sleep(self._interval_s)
            try:
                await self.reconcile()
            except JfsyncError as err:
                logger.warning("full reconcile failed: %s", err)
            except Exception:
                logger.exception("full reconcile failed unexpectedly; trying again next time")

    # ------------------------------------------------------------------ library changes

    def library_changed(self, event: LibraryChangedEvent) -> None:
        """Note a ``LibraryChanged`` message; the refresher re-reads the items after a pause."""
        changed = set(event.items_added) | set(event.items_updated)
        removed = set(event.items_removed)
        if not changed and not removed:
            return
        self._changed.setdefault(event.server, set()).update(changed)
        self._removed.setdefault(event.server, set()).update(removed)
        self._poke.set()

    def request_refresh(self, server: str, ids: set[str]) -> None:
        """Ask the refresher to re-read some ids (items the index does not hold yet)."""
        self._changed.setdefault(server, set()).update(ids)
        self._poke.set()

    def request_user_catch_up(self, server: str, remote_user_id: str, user: str) -> None:
        """Ask the refresher to catch up one user of one server (soon, debounced)."""
        self._users_due.add((server, remote_user_id, user))
        self._poke.set()

    def request_catch_up(self, change: IdentityChange) -> None:
        """Ask the refresher to catch up the users of servers whose id map moved."""
        self._catch_up_due.update(change.servers)
        self._poke.set()

    async def refresh_now(self) -> IdentityChange:
        """Apply the library changes noted so far, then catch up the servers they moved."""
        async with self._lock:
            changed, self._changed = self._changed, {}
            removed, self._removed = self._removed, {}
            due, self._catch_up_due = self._catch_up_due, set()
            total = IdentityChange()
            for server in sorted(set(changed) | set(removed)):
                if server not in self.clients:
                    continue
                ids = changed.get(server, set())
                try:
                    if len(ids) > FULL_RESCAN_OVER:
                        total = total | await self.identity.refresh([server])
                    else:
                        total = total | await self.identity.library_changed(
                            server, ids, removed.get(server, set())
                        )
                except JfsyncError as err:
                    logger.warning("[%s] library refresh failed: %s", server, err)
            self.library_refreshes += 1
            servers = total.servers | due
            await self._catch_up_servers(sorted(servers))
            users, self._users_due = self._users_due, set()
            for server, remote_user_id, user in sorted(users):
                if server in servers or server not in self.clients:
                    continue  # caught up whole just now
                try:
                    await self.catch_up(server, remote_user_id, user)
                except ServerError as err:
                    logger.warning("[%s] catch-up of user %s failed: %s", server, user, err)
            return total

    async def _library_loop(self) -> None:
        while True:
            await self._poke.wait()
            await self.clock.sleep(self._debounce_s)
            self._poke.clear()
            try:
                await self.refresh_now()
            except JfsyncError as err:
                # What was noted is lost with the failed refresh; the periodic reconcile and
                # the next library change repair the id map.
                logger.warning("library refresh failed: %s", err)
            except Exception:
                logger.exception("library refresh failed unexpectedly; waiting for the next change")

    async def _catch_up_servers(self, servers: Iterable[str]) -> None:
        users = self._users()
        for server in servers:
            for remote_user_id, user in users.get(server, {}).items():
                try:
                    await self.catch_up(server, remote_user_id, user)
                except ServerError as err:
                    logger.warning("[%s] catch-up of user %s failed: %s", server, user, err)

    def status(self) -> dict[str, Any]:
        """The last full reconcile and refresh counts, for the status endpoint."""
        report = self.last_report
        return {
            "interval_s": self._interval_s,
            "library_refreshes": self.library_refreshes,
            "last": None
            if report is None
            else {
                "started_ms": report.started_ms,
                "finished_ms": report.finished_ms,
                "changes": report.changed,
                "errors": list(report.errors),
                "summary": report.summary(),
            },
        }


__all__ = [
    "CatchUpResult",
    "ReconcileReport",
    "Reconciler",
]
