"""Catch-up, library refreshes, the periodic full reconcile and ``jfsync reconcile``.

:meth:`Reconciler.catch_up` is what jfsync does for one (server, user) after every (re)connect
and in every full reconcile: list the user's items with non-default data on that server
(:func:`jfsync.sync.catchup.scan_non_default`), map them through the identity, diff them against the
ledger's last-known states and apply the differences through the ledger's one merge path
(source ``scan``). A known non-default item missing from the listing is re-read by id first:
if the server still has it, the state read (usually the default: a reset) is the observation;
if it is gone (removed, moved), nothing is observed, so a deleted file never un-plays or
un-favourites an item elsewhere. Then every non-default canonical item the server has but has
no history of is queued for it (first-contact merge at write time).

With a reset guard (:mod:`jfsync.sync.resetguard`), a scan showing the user's data on that server
regressed wholesale to defaults is a server that lost its data: the regressed items are
restored from the canonical state instead of propagated (``restore``), or the whole (server,
user) is held for the operator (``hold``); a held pair is not caught up until resolved.

:class:`Reconciler` also owns two background tasks in the service: the periodic full reconcile
(``sync.reconcile_interval``, on the injected clock: rescan every library, match again, catch up
every user of every reachable server) and the debounced ``LibraryChanged`` refresh (re-read the
items named, match again, catch up the servers whose id map moved).

:func:`run_reconcile` is ``jfsync reconcile``: one full reconcile, then delivery of everything
owed, then exit. With ``dry_run`` it works on a copy of the ledger file taken through a
read-only SQLite connection and never writes to a server: it reads what each write would
target and reports, per user and server, what would change (before and after). The ledger file
itself is left byte-for-byte as it was. The real run executes the same steps with the writes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from jfsync.config import Config
from jfsync.errors import JfsyncError, ServerError
from jfsync.jellyfin.api import JellyfinClient
from jfsync.model import TICKS_PER_SECOND, PlayState, Register, UserData
from jfsync.sync.catchup import catchup_observations, scan_non_default
from jfsync.sync.identity import IdentityChange, IndexedIdentity, ItemIdentity
from jfsync.sync.ledger import Applied, ItemMapping, Ledger, OutboxRow, Outcome
from jfsync.sync.merge import MergePolicy
from jfsync.sync.resetguard import ResetGuard, ResetRule, regressed_items
from jfsync.sync.subscriber import LibraryChangedEvent
from jfsync.sync.users import match_users, person_fields
from jfsync.tasks import cancel_and_wait
from jfsync.timing import Clock, SystemClock

logger = logging.getLogger(__name__)

#: Observations applied per ledger transaction during a catch-up.
SCAN_BATCH = 1000
#: Quiet time after a ``LibraryChanged`` before the index is refreshed.
LIBRARY_DEBOUNCE_S = 2.0
#: More changed ids than this in one refresh: rescan the whole library instead.
FULL_RESCAN_OVER = 5000
#: Rows read and written per delivery round of ``jfsync reconcile``.
DELIVERY_BATCH = 100
#: Writes in flight to one server at once during ``jfsync reconcile``.
WRITE_CONCURRENCY = 8

#: server -> remote user id -> canonical user key, for the users to catch up.
UsersOf = Callable[[], Mapping[str, Mapping[str, str]]]
AppliedHook = Callable[[list[Applied]], None]
ResultHook = Callable[["ReconcileReport"], None]


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
    ) -> None:
        self.ledger = ledger
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
        scanned = await scan_non_default(client, remote_user_id, parents)
        items = await self.identity.canonical_items(server, list(scanned))
        if not self.identity.complete:
            # Identities that map lazily learn the server's ids from what it shows.
            await ledger.map_items(
                server,
                [
                    ItemMapping(
                        remote_id=remote,
                        item=items[remote],
                        item_type=found.item.type,
                        path=found.item.path,
                        provider_ids=dict(found.item.provider_ids) or None,
                    )
                    for remote, found in scanned.items()
                    if remote in items
                ],
            )
        states = {items[r]: found.data for r, found in scanned.items() if r in items}
        known = await ledger.last_known_for_user(server, user)
        missing = [k for k, s in known.items() if k not in states and not s.is_default]
        gone: set[str] = set()
        if missing:
            still = await self._read_by_key(client, server, remote_user_id, missing)
            gone = set(missing) - set(still)
            states.update(still)
            resets = sum(1 for k in still if still[k].is_default)
        else:
            resets = 0
        known_here = {k: v for k, v in known.items() if k not in gone}
        lost: dict[str, UserData] = {}
        non_default = 0
        if guard is not None:
            regressed = regressed_items(known_here, states, ledger.policy.synced)
            non_default = sum(1 for v in known_here.values() if v.holds_data(ledger.policy.synced))
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
        observations = catchup_observations(server, user, states, known_here, read_ms, read_seq)
        changed = 0
        for start in range(0, len(observations), SCAN_BATCH):
            applied = await ledger.apply_observations(observations[start : start + SCAN_BATCH])
            changed += sum(a.outcome is Outcome.CHANGED for a in applied)
            if self._on_applied is not None:
                self._on_applied(applied)
        restored = await ledger.rebase_last_known(server, user, lost, read_ms) if lost else 0
        if self.identity.complete:
            queued = await ledger.backfill_mapped(server, user, self.clock.wall_ms())
        else:
            queued = await ledger.backfill(server, user, self.clock.wall_ms())
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


# ---------------------------------------------------------------------- jfsync reconcile


@dataclass(frozen=True, slots=True)
class PlannedWrite:
    """One write a reconcile makes (or, in a dry run, would make) to one server."""

    server: str
    user: str
    item: str
    #: The server's own id of the item.
    remote_item_id: str
    label: str
    before: UserData
    after: UserData
    registers: frozenset[Register]


@dataclass(slots=True)
class ReconcileOutcome:
    """Everything ``jfsync reconcile`` did or would do."""

    dry_run: bool
    report: ReconcileReport | None = None
    writes: list[PlannedWrite] = field(default_factory=list)
    #: (user, server) -> items owed to a server that does not have them (not written).
    missing: dict[tuple[str, str], int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    user_names: dict[str, str] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    #: Issue 14: per server with a library filter, what it syncs and leaves out (one line).
    libraries: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[tuple[str, str], int]:
        """Writes per (user, server)."""
        found: dict[tuple[str, str], int] = {}
        for write in self.writes:
            key = (write.user, write.server)
            found[key] = found.get(key, 0) + 1
        return found

    @property
    def ok(self) -> bool:
        """True when every server answered and every write succeeded."""
        return not self.failures and not self.problems


async def run_reconcile(
    config: Config,
    *,
    dry_run: bool,
    clock: Clock | None = None,
    out: TextIO | None = None,
    sample: int = 5,
) -> ReconcileOutcome:
    """Run one full reconcile of the configured servers and deliver (or plan) every write."""
    clock = clock or SystemClock()
    outcome = ReconcileOutcome(dry_run=dry_run)
    with tempfile.TemporaryDirectory(prefix="jfsync-reconcile-") as tmp:
        work = Path(tmp) / "ledger.db" if dry_run else config.ledger
        if dry_run:
            await asyncio.to_thread(copy_ledger, config.ledger, work)
        work_config = config.model_copy(update={"ledger": work})
        ledger = Ledger(work, MergePolicy.from_config(config), user_map=config.users.map)
        await ledger.open()
        try:
            async with aiohttp.ClientSession() as session:
                await _reconcile_with(work_config, ledger, session, clock, outcome)
        finally:
            await ledger.close()
    if out is not None:
        print_outcome(outcome, out, sample=sample)
    return outcome


async def _reconcile_with(
    config: Config,
    ledger: Ledger,
    session: aiohttp.ClientSession,
    clock: Clock,
    outcome: ReconcileOutcome,
) -> None:
    clients: dict[str, JellyfinClient] = {}
    for server in config.servers:
        assert server.api_key is not None
        clients[server.name] = JellyfinClient(
            server.name,
            server.url,
            server.api_key.get_secret_value(),
            session=session,
            device_id=f"jfsync-rest-{server.name}",
            timeout_s=server.timeout_s,
            verify_tls=server.verify_tls,
        )
    accounts = {}
    for name, client in clients.items():
        try:
            await client.ensure_supported()
            accounts[name] = await client.users()
        except ServerError as err:
            outcome.problems.append(str(err))
    if outcome.problems:
        return
    match = match_users(config, accounts)
    outcome.problems.extend(f"users: {p}" for p in match.problems)
    # Issue 14: each person's register choices (the policy from the config has no user keys).
    await ledger.set_policy(ledger.policy.with_user_fields(person_fields(config, match)))
    users: dict[str, dict[str, str]] = {name: {} for name in clients}
    for person in match.users:
        outcome.user_names[person.key] = person.display_name
        for name, account in person.accounts.items():
            users[name][account.id] = person.key
            await ledger.map_user(name, account.id, person.key, name=account.name)
    identity = IndexedIdentity(config, ledger, clock)
    await identity.start(clients)
    try:
        # The same guard as the service: a wiped server is restored (or held), not propagated.
        guard = ResetGuard(ResetRule.from_config(config), ledger, clock)
        await guard.load()
        reconciler = Reconciler(ledger, identity, clients, clock, users=lambda: users, guard=guard)
        outcome.report = await reconciler.reconcile()
        outcome.identity = identity.status()
        for name in clients:
            scope = identity.index.scope(name)
            if scope is not None:
                outcome.libraries[name] = scope.describe()
        await _deliver(ledger, identity, clients, users, clock, outcome)
    finally:
        await identity.close()


async def _deliver(
    ledger: Ledger,
    identity: IndexedIdentity,
    clients: Mapping[str, JellyfinClient],
    users: Mapping[str, Mapping[str, str]],
    clock: Clock,
    outcome: ReconcileOutcome,
) -> None:
    """Drain every peer's outbox like the pusher does, writing only when not a dry run."""
    done: set[tuple[str, str, str]] = set()
    progress = True
    while progress:
        progress = False
        for peer, client in clients.items():
            while True:
                rows = [
                    r
                    for r in await ledger.due_rows(peer, DELIVERY_BATCH, clock.wall_ms())
                    if (peer, r.user, r.item) not in done
                ]
                if not rows:
                    break
                progress = True
                await _deliver_batch(ledger, identity, client, peer, rows, clock, outcome, done)


async def _deliver_batch(
    ledger: Ledger,
    identity: IndexedIdentity,
    client: JellyfinClient,
    peer: str,
    rows: Sequence[OutboxRow],
    clock: Clock,
    outcome: ReconcileOutcome,
    done: set[tuple[str, str, str]],
) -> None:
    current: dict[tuple[str, str], UserData] = {}
    by_user: dict[str, list[OutboxRow]] = {}
    for row in rows:
        by_user.setdefault(row.remote_user_id or row.user, []).append(row)
    for remote_user, user_rows in by_user.items():
        wanted = {(r.remote_item_id or r.item): r for r in user_rows}
        async for item in client.iter_items(
            remote_user, ids=list(wanted), fields=(), include_types=(), recursive=True
        ):
            match = wanted.get(item.id)
            if match is not None and item.user_data is not None:
                current[(match.user, match.item)] = item.user_data.to_user_data()
    labels = await identity.index.find(peer, [r.remote_item_id for r in rows if r.remote_item_id])
    reads: list[tuple[OutboxRow, UserData]] = []
    for row in rows:
        done.add((peer, row.user, row.item))
        state = current.get((row.user, row.item))
        if state is not None:
            reads.append((row, state))
            continue
        key = (row.user, peer)
        outcome.missing[key] = outcome.missing.get(key, 0) + 1
        if not outcome.dry_run:
            await ledger.row_dead(row, f"item {row.item} not found on {peer} for that user")
    # As the pusher: what the target changed behind the event path is merged first.
    fresh_rows = await ledger.observe_before_writes(reads, clock.wall_ms())
    todo = [
        (fresh, state)
        for (_, state), fresh in zip(reads, fresh_rows, strict=True)
        if fresh is not None
    ]
    semaphore = asyncio.Semaphore(WRITE_CONCURRENCY)

    async def write(fresh: OutboxRow, state: UserData) -> ServerError | None:
        if outcome.dry_run:
            return None
        async with semaphore:
            try:
                await client.apply_user_data(
                    fresh.remote_user_id or fresh.user,
                    fresh.remote_item_id or fresh.item,
                    fresh.desired,
                    state,
                    fresh.registers,
                )
            except ServerError as err:
                return err
        return None

    results = await asyncio.gather(*(write(fresh, state) for fresh, state in todo))
    acks: list[tuple[OutboxRow, UserData]] = []
    for (fresh, state), error in zip(todo, results, strict=True):
        label = (
            labels[fresh.remote_item_id].label() if fresh.remote_item_id in labels else fresh.item
        )
        if error is not None:
            outcome.failures.append(f"{peer}: {label}: {error}")
            await ledger.row_failed(fresh, str(error), clock.wall_ms() + 3_600_000)
            continue
        after = fresh.intended(state)
        acks.append((fresh, after))
        outcome.writes.append(
            PlannedWrite(
                peer,
                fresh.user,
                fresh.item,
                fresh.remote_item_id or fresh.item,
                label,
                state,
                after,
                fresh.registers,
            )
        )
    await ledger.rows_written(acks, clock.wall_ms())


def copy_ledger(source: Path, target: Path) -> None:
    """Copy the ledger at ``source`` into ``target`` through a read-only connection.

    A consistent snapshot even while ``jfsync run`` writes it; the source file is not
    modified. A missing source leaves ``target`` absent (a fresh ledger is then created).
    """
    if not source.exists():
        return
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        writer = sqlite3.connect(target)
        try:
            reader.backup(writer)
        finally:
            writer.close()
    finally:
        reader.close()


# ---------------------------------------------------------------------- report text


def print_outcome(outcome: ReconcileOutcome, out: TextIO, *, sample: int = 5) -> None:
    """Print what a reconcile did or would do: per user and server, counts and a sample."""
    verb = "would change" if outcome.dry_run else "changed"
    title = "jfsync reconcile --dry-run" if outcome.dry_run else "jfsync reconcile"
    print(title, file=out)
    for problem in outcome.problems:
        print(f"  problem: {problem}", file=out)
    if outcome.report is None:
        print("nothing done", file=out)
        return
    for pair in outcome.identity.get("pairs", []):
        a, b = pair["servers"]
        by = pair.get("unmatched_by_server", {})
        print(
            f"items {a} <-> {b}: {pair['matched']} matched, "
            f"{by.get(a, 0)} only on {a}, {by.get(b, 0)} only on {b}, "
            f"{pair['ambiguous']} ambiguous (not synced)",
            file=out,
        )
        for amb in pair.get("samples", {}).get("ambiguous", [])[:sample]:
            print(f"    ambiguous on {amb['server']}: {amb['name']}", file=out)
    for server, text in sorted(outcome.libraries.items()):
        print(f"libraries of {server}: {text} (excluded ones are never read or written)", file=out)
    counts = outcome.counts()
    users = sorted({u for u, _ in counts} | {u for u, _ in outcome.missing})
    for user in users:
        print(f"user {outcome.user_names.get(user, user)}:", file=out)
        for server in sorted({s for u, s in counts if u == user} | _servers_missing(outcome, user)):
            n = counts.get((user, server), 0)
            print(f"  {server}: {n} item{'s' if n != 1 else ''} {verb}", file=out)
            shown = [w for w in outcome.writes if w.user == user and w.server == server]
            for write in shown[:sample]:
                print(f"    {write.label}: {describe_change(write)}", file=out)
            if len(shown) > sample:
                print(f"    ... and {len(shown) - sample} more", file=out)
            missing = outcome.missing.get((user, server), 0)
            if missing:
                print(f"    ({missing} owed items are not on {server}; nothing to write)", file=out)
    if not users:
        print("nothing to change: every server already agrees", file=out)
    total = len(outcome.writes)
    print(
        f"total: {total} write{'s' if total != 1 else ''} "
        f"{'would be made' if outcome.dry_run else 'made'}",
        file=out,
    )
    for failure in outcome.failures:
        print(f"  failed: {failure}", file=out)
    if outcome.dry_run:
        print("dry run: no server was written to and the ledger file was not modified", file=out)


def _servers_missing(outcome: ReconcileOutcome, user: str) -> set[str]:
    return {s for u, s in outcome.missing if u == user}


def describe_change(write: PlannedWrite) -> str:
    """Say what a write changes, e.g. ``favourite no -> yes; unplayed -> played (1 play, ...)``."""
    parts: list[str] = []
    before, after = write.before, write.after
    if Register.FAVORITE in write.registers and before.favorite != after.favorite:
        parts.append(f"favourite {_yes(before.favorite)} -> {_yes(after.favorite)}")
    if Register.RATING in write.registers and before.rating != after.rating:
        parts.append(f"rating {_rating(before.rating)} -> {_rating(after.rating)}")
    if Register.PLAY_STATE in write.registers and before.play_state != after.play_state:
        parts.append(f"{_play(before.play_state)} -> {_play(after.play_state)}")
    return "; ".join(parts) or "no visible change"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _rating(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _play(state: PlayState) -> str:
    if state.is_default:
        return "unplayed"
    text = "played" if state.played else "not played"
    details = [f"{state.play_count} play{'' if state.play_count == 1 else 's'}"]
    if state.last_played_s is not None:
        when = datetime.fromtimestamp(state.last_played_s, tz=UTC).strftime("%Y-%m-%d %H:%M")
        details.append(f"last {when}")
    if state.position_ticks:
        seconds = state.position_ticks // TICKS_PER_SECOND
        details.append(f"at {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}")
    return f"{text} ({', '.join(details)})"


__all__ = [
    "CatchUpResult",
    "PlannedWrite",
    "ReconcileOutcome",
    "ReconcileReport",
    "Reconciler",
    "copy_ledger",
    "print_outcome",
    "run_reconcile",
]
