"""``jfsync reconcile``: one full reconcile, delivery of everything owed, a report, then exit.

:func:`run_reconcile` reaches every configured server, matches users and items, runs one full
reconcile (:class:`jfsync.sync.reconcile.Reconciler`, with the service's reset guard), then
delivers what every peer is owed through the pusher of ``jfsync run``
(:meth:`jfsync.sync.delivery.Pusher.drain`: compare read, intents written ahead, quick retries,
a down peer probed for a while, a refused key pausing that peer) and prints what changed per
user and server (:func:`print_outcome`).

With ``dry_run`` it works on a copy of the ledger file taken through a read-only SQLite
connection (:func:`copy_ledger`) and the pushers send no write: they read what each write
would target, and the report says what would change (before and after). The ledger file itself
is left byte-for-byte as it was. The real run executes the same steps with the writes.

The report keeps every write, but not in memory: a first reconcile of a large library makes
hundreds of thousands of writes, so each one is appended to a temporary file as it is made
(:class:`WriteLog`, counts per user and server kept beside it) and read back, in order, by
whoever iterates :attr:`ReconcileOutcome.writes`; the printed report reads it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import sqlite3
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from jfsync.config import Config
from jfsync.errors import ServerError
from jfsync.heap import map_large_blocks, release_free_memory
from jfsync.jellyfin.api import JellyfinClient
from jfsync.model import TICKS_PER_SECOND, PlayState, Register, UserData
from jfsync.sync.delivery import Delivered, DeliveryWatcher, Pusher
from jfsync.sync.identity import IndexedIdentity
from jfsync.sync.ledger import Ledger, OutboxRow
from jfsync.sync.ledger.schema import sqlite_uri
from jfsync.sync.merge import MergePolicy
from jfsync.sync.reconcile import Reconciler, ReconcileReport
from jfsync.sync.resetguard import ResetGuard, ResetRule
from jfsync.sync.users import match_users, person_fields
from jfsync.tasks import cancel_and_wait
from jfsync.timing import Clock, SystemClock

logger = logging.getLogger(__name__)


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


def _encode(write: PlannedWrite) -> tuple[Any, ...]:
    before, after = write.before, write.after
    b, a = before.play_state, after.play_state
    return (
        write.server,
        write.user,
        write.item,
        write.remote_item_id,
        write.label,
        before.favorite,
        before.rating,
        b.played,
        b.play_count,
        b.last_played_s,
        b.position_ticks,
        after.favorite,
        after.rating,
        a.played,
        a.play_count,
        a.last_played_s,
        a.position_ticks,
        "".join(sorted(r.value[0] for r in write.registers)),
    )


#: Registers by the first letter of their value (the encoding of a write's register set).
_REGISTER_OF = {r.value[0]: r for r in Register}


def _decode(record: tuple[Any, ...]) -> PlannedWrite:
    (server, user, item, remote, label, bf, br, bp, bc, bl, bt, af, ar, ap, ac, al, at, regs) = (
        record
    )
    return PlannedWrite(
        server,
        user,
        item,
        remote,
        label,
        UserData(bf, br, PlayState(bp, bc, bl, bt)),
        UserData(af, ar, PlayState(ap, ac, al, at)),
        frozenset(_REGISTER_OF[c] for c in regs),
    )


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class WriteLog:
    """The writes of one reconcile in the order they were made, kept in a temporary file.

    Appending buffers up to :data:`WriteLog.BUFFER` writes in memory, then adds them to the
    file; iterating reads the file back one write at a time, so memory stays flat however many
    writes a reconcile makes. Counts per (user, server) and the first :data:`WriteLog.FIRST`
    writes of each are kept in memory. When the file cannot be written (no room), the writes
    from then on stay in memory, with a warning. The file is removed when the log is
    garbage-collected (or at exit). Compares equal to a list of the same writes.
    """

    BUFFER = 1000
    #: The first writes of each (user, server) also kept in memory, for the printed samples.
    FIRST = 20

    def __init__(self) -> None:
        self._buffer: list[tuple[Any, ...]] = []
        self._path: str | None = None
        self._length = 0
        self._counts: dict[tuple[str, str], int] = {}
        self._first: dict[tuple[str, str], list[PlannedWrite]] = {}
        #: Writes and bytes in the file; True once the file failed (the rest kept in memory).
        self._stored = 0
        self._stored_bytes = 0
        self._in_memory = False
        self._finalizer: weakref.finalize[Any, WriteLog] | None = None

    def __repr__(self) -> str:
        return f"WriteLog({self._length} writes)"

    def append(self, write: PlannedWrite) -> None:
        """Add one write at the end."""
        self._buffer.append(_encode(write))
        self._length += 1
        key = (write.user, write.server)
        self._counts[key] = self._counts.get(key, 0) + 1
        first = self._first.setdefault(key, [])
        if len(first) < self.FIRST:
            first.append(write)
        if len(self._buffer) >= self.BUFFER:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer or self._in_memory:
            return
        data = b"".join(marshal.dumps(record) for record in self._buffer)
        try:
            if self._path is None:
                fd, path = tempfile.mkstemp(prefix="jfsync-reconcile-writes-")
                os.close(fd)
                self._path = path
                self._finalizer = weakref.finalize(self, _discard, path)
            with open(self._path, "ab") as file:
                file.write(data)
        except OSError as err:
            # No room or no temporary directory: the rest stays in memory, nothing is lost.
            logger.warning(
                "the reconcile report cannot use a temporary file (%s); keeping its writes "
                "in memory",
                str(err),  # the text only: the error's traceback would hold this log
            )
            self._in_memory = True
            if self._path is not None:
                with contextlib.suppress(OSError):
                    os.truncate(self._path, self._stored_bytes)
            return
        self._stored += len(self._buffer)
        self._stored_bytes += len(data)
        self._buffer.clear()

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def __iter__(self) -> Iterator[PlannedWrite]:
        stored, pending = self._stored, list(self._buffer)
        if stored and self._path is not None:
            with open(self._path, "rb") as file:
                for _ in range(stored):
                    # The file is this process's own (mkstemp: mode 0600), written above.
                    yield _decode(marshal.load(file))  # noqa: S302
        for record in pending:
            yield _decode(record)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WriteLog | list | tuple):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def counts(self) -> dict[tuple[str, str], int]:
        """Writes per (user, server)."""
        return dict(self._counts)

    def first(self, sample: int) -> dict[tuple[str, str], list[PlannedWrite]]:
        """The first ``sample`` writes of each (user, server), in order (read from the file
        only when more than :attr:`FIRST` are asked for)."""
        if sample <= self.FIRST:
            return {key: kept[:sample] for key, kept in self._first.items()}
        shown: dict[tuple[str, str], list[PlannedWrite]] = {}
        for write in self:
            kept = shown.setdefault((write.user, write.server), [])
            if len(kept) < sample:
                kept.append(write)
        return shown

    def close(self) -> None:
        """Remove the file now (the log is empty afterwards)."""
        self._buffer.clear()
        self._length = 0
        self._stored = 0
        self._stored_bytes = 0
        self._counts.clear()
        self._first.clear()
        if self._finalizer is not None:
            self._finalizer()
        self._path = None


@dataclass(slots=True)
class ReconcileOutcome:
    """Everything ``jfsync reconcile`` did or would do."""

    dry_run: bool
    report: ReconcileReport | None = None
    #: Every write made (or planned), in order; on disk, read back when iterated.
    writes: WriteLog = field(default_factory=WriteLog)
    #: (user, server) -> items owed to a server that does not have them (not written).
    missing: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (user, server) -> items the server showed back to never-touched after the scan (left
    #: queued: the next catch-up decides whether the server lost them or the user reset them).
    deferred: dict[tuple[str, str], int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    user_names: dict[str, str] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    #: Per server with a library filter, what it syncs and leaves out (one line).
    libraries: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[tuple[str, str], int]:
        """Writes per (user, server)."""
        return self.writes.counts()

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
    pusher_options: Mapping[str, Any] | None = None,
) -> ReconcileOutcome:
    """Run one full reconcile of the configured servers and deliver (or plan) every write.

    ``pusher_options`` are passed to every :class:`Pusher` (retry and probe timings).
    """
    clock = clock or SystemClock()
    outcome = ReconcileOutcome(dry_run=dry_run)
    # Whole-library passes free large blocks one after the other: have them unmapped when
    # freed, not kept in the heap (glibc; a no-op elsewhere). See jfsync.heap.
    map_large_blocks()
    with tempfile.TemporaryDirectory(prefix="jfsync-reconcile-") as tmp:
        work = Path(tmp) / "ledger.db" if dry_run else config.ledger
        if dry_run:
            await asyncio.to_thread(copy_ledger, config.ledger, work)
        work_config = config.model_copy(update={"ledger": work})
        ledger = Ledger(work, MergePolicy.from_config(config), user_map=config.users.map)
        await ledger.open()
        try:
            async with aiohttp.ClientSession() as session:
                await _reconcile_with(
                    work_config, ledger, session, clock, outcome, dict(pusher_options or {})
                )
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
    pusher_options: dict[str, Any],
) -> None:
    clients: dict[str, JellyfinClient] = {}
    for server in config.servers:
        clients[server.name] = JellyfinClient.for_server(
            server, session=session, device_id=f"jfsync-rest-{server.name}"
        )
    try:
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
        # Each person's register choices (the policy from the config has no user keys).
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
            reconciler = Reconciler(
                ledger, identity, clients, clock, users=lambda: users, guard=guard
            )
            outcome.report = await reconciler.reconcile()
            # The catch-ups' temporaries are free: their pages go back before delivery starts.
            await asyncio.to_thread(release_free_memory)
            outcome.identity = identity.status()
            for name in clients:
                scope = identity.index.scope(name)
                if scope is not None:
                    outcome.libraries[name] = scope.describe()
            await _deliver(ledger, identity, clients, clock, outcome, pusher_options)
        finally:
            await identity.close()
    finally:
        # The write lanes' connections (the session is the caller's to close).
        for client in clients.values():
            await client.close()


class _Collector(DeliveryWatcher):
    """What the pushers did with each row, for the report (the writes in a :class:`WriteLog`,
    still without their labels)."""

    def __init__(self) -> None:
        self.made = WriteLog()
        #: (peer, user, item) -> the row and why its write failed (until a retry made it).
        self.failures: dict[tuple[str, str, str], tuple[OutboxRow, ServerError]] = {}
        #: (user, peer) -> rows owed to a peer that does not have the item.
        self.absent: dict[tuple[str, str], int] = {}
        #: (user, peer) -> rows read back as never touched, left for a catch-up.
        self.held: dict[tuple[str, str], int] = {}

    def written(self, peer: str, writes: Sequence[Delivered]) -> None:
        for write in writes:
            row = write.row
            remote = row.remote_item_id or row.item
            self.made.append(
                PlannedWrite(
                    peer, row.user, row.item, remote, "", write.before, write.after, row.registers
                )
            )
            self.failures.pop((peer, row.user, row.item), None)

    def failed(self, peer: str, row: OutboxRow, error: ServerError) -> None:
        self.failures[(peer, row.user, row.item)] = (row, error)

    def missing(self, peer: str, row: OutboxRow) -> None:
        key = (row.user, peer)
        self.absent[key] = self.absent.get(key, 0) + 1

    def deferred(self, peer: str, rows: Sequence[OutboxRow]) -> None:
        for row in rows:
            key = (row.user, peer)
            self.held[key] = self.held.get(key, 0) + 1


async def _deliver(
    ledger: Ledger,
    identity: IndexedIdentity,
    clients: Mapping[str, JellyfinClient],
    clock: Clock,
    outcome: ReconcileOutcome,
    pusher_options: dict[str, Any],
) -> None:
    """Drain every peer's outbox through its pusher (sending nothing in a dry run)."""
    collector = _Collector()
    pushers = {
        peer: Pusher(
            peer,
            ledger,
            client,
            clock,
            watcher=collector,
            dry_run=outcome.dry_run,
            **pusher_options,
        )
        for peer, client in clients.items()
    }
    # The operator asks for everything owed, now: rows waiting to be retried after an
    # earlier failure are due at once, as when a peer comes back (parked rows stay parked).
    for peer in pushers:
        await ledger.reset_backoff(peer)
    stopped: dict[str, str] = {}
    todo = list(pushers)
    while todo:
        reasons = await _drain_all([pushers[peer] for peer in todo])
        stopped.update((peer, r) for peer, r in zip(todo, reasons, strict=True) if r is not None)
        # What a compare read found changed on one peer may be owed to another, whose
        # drain may be over: go round again for every peer with rows due.
        now_ms = clock.wall_ms()
        todo = [
            peer
            for peer in pushers
            if peer not in stopped and await ledger.due_rows(peer, 1, now_ms)
        ]
    await asyncio.to_thread(release_free_memory)
    await _report(ledger, identity, collector, stopped, outcome)


async def _drain_all(pushers: Sequence[Pusher]) -> list[str | None]:
    """Drain the pushers side by side; return why each stopped early (None: all done)."""
    tasks = [
        asyncio.create_task(p.drain(), name=f"jfsync-reconcile-deliver[{p.peer}]") for p in pushers
    ]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # One failed (the ledger, a bug): the others end too, and the error is raised.
        await cancel_and_wait([t for t in tasks if not t.done()], logger)


#: Writes labelled (one index lookup per server) between two turns of the event loop.
_REPORT_STEP = 250


async def _report(
    ledger: Ledger,
    identity: IndexedIdentity,
    collector: _Collector,
    stopped: Mapping[str, str],
    outcome: ReconcileOutcome,
) -> None:
    """Turn what the pushers did into the outcome, with each item's readable name.

    The writes are read back from the collector's log a slice at a time, labelled and added
    to the outcome's log, so no more than a slice of them is in memory at once.
    """
    index = identity.index

    async def label_slice(chunk: list[PlannedWrite]) -> None:
        wanted: dict[str, set[str]] = {}
        for write in chunk:
            wanted.setdefault(write.server, set()).add(write.remote_item_id)
        labels = {peer: await index.find(peer, ids) for peer, ids in wanted.items()}
        for write in chunk:
            found = labels[write.server].get(write.remote_item_id)
            outcome.writes.append(
                replace(write, label=found.label() if found is not None else write.item)
            )

    chunk: list[PlannedWrite] = []
    for write in collector.made:
        chunk.append(write)
        if len(chunk) >= _REPORT_STEP:
            await label_slice(chunk)  # a report of 100,000 writes must not stall the loop
            chunk = []
    if chunk:
        await label_slice(chunk)
    collector.made.close()
    outcome.missing.update(collector.absent)
    outcome.deferred.update(collector.held)
    failed: dict[str, set[str]] = {}
    for (peer, _, _), (row, _) in collector.failures.items():
        failed.setdefault(peer, set()).add(row.remote_item_id or row.item)
    labels = {peer: await index.find(peer, ids) for peer, ids in failed.items()}
    for (peer, _, _), (row, error) in collector.failures.items():
        found = labels[peer].get(row.remote_item_id or row.item)
        name = found.label() if found is not None else row.item
        outcome.failures.append(f"{peer}: {name}: {error}")
    for peer, reason in stopped.items():
        owed = await ledger.outbox_depth(peer)
        if outcome.dry_run:
            outcome.failures.append(f"{peer}: {reason}; {owed} owed writes could not be planned")
        else:
            outcome.failures.append(f"{peer}: {reason}; {owed} writes stay queued for later")


def copy_ledger(source: Path, target: Path) -> None:
    """Copy the ledger at ``source`` into ``target`` through a read-only connection.

    A consistent snapshot even while ``jfsync run`` writes it; the source file is not
    modified. A missing source leaves ``target`` absent (a fresh ledger is then created).
    """
    if not source.exists():
        return
    reader = sqlite3.connect(sqlite_uri(str(source), "mode=ro"), uri=True)
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
    shown = outcome.writes.first(sample)
    noted = set(outcome.missing) | set(outcome.deferred)
    users = sorted({u for u, _ in counts} | {u for u, _ in noted})
    for user in users:
        print(f"user {outcome.user_names.get(user, user)}:", file=out)
        for server in sorted(
            {s for u, s in counts if u == user} | {s for u, s in noted if u == user}
        ):
            n = counts.get((user, server), 0)
            print(f"  {server}: {n} item{'s' if n != 1 else ''} {verb}", file=out)
            for write in shown.get((user, server), []):
                print(f"    {write.label}: {describe_change(write)}", file=out)
            if n > sample:
                print(f"    ... and {n - sample} more", file=out)
            missing = outcome.missing.get((user, server), 0)
            if missing:
                print(f"    ({missing} owed items are not on {server}; nothing to write)", file=out)
            deferred = outcome.deferred.get((user, server), 0)
            if deferred:
                print(
                    f"    ({deferred} items read as never touched on {server} after the scan; "
                    "left queued for the next catch-up to decide)",
                    file=out,
                )
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
    "PlannedWrite",
    "ReconcileOutcome",
    "WriteLog",
    "copy_ledger",
    "describe_change",
    "print_outcome",
    "run_reconcile",
]
