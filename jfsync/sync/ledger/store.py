"""The ledger itself: :class:`Ledger`, its connection and transactions, and its public API.

One :class:`Ledger` owns one aiosqlite connection to one file (WAL, foreign keys, schema from
:mod:`~jfsync.sync.ledger.schema`, the file held by :mod:`~jfsync.sync.ledger.lock`) and runs
every read and write transaction on it, one at a time, each as ONE call on the connection's
thread: a method builds a plain function of its reads, its apply logic and its writes (BEGIN
IMMEDIATE to COMMIT for a write, :func:`~jfsync.sync.ledger.schema.write_transaction`) and awaits
it once (:func:`~jfsync.sync.ledger.schema.run_on_thread`). Its methods put the other modules of
the package to work: :mod:`~jfsync.sync.ledger.batch` applies observations, compare reads, intents
and acks; :mod:`~jfsync.sync.ledger.writer` is the only writer of the cached tables and keeps
:mod:`~jfsync.sync.ledger.cache` right; :mod:`~jfsync.sync.ledger.outbox` and
:mod:`~jfsync.sync.ledger.maps` hold the outbox queries and the id maps;
:mod:`~jfsync.sync.ledger.policy` the policy in force, replaced whole on a config reload; the
reset guard's holds (:class:`ResetHold`), the servers away from the config and the stored
tokens are plain tables read and written here.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

import aiosqlite

from jfsync.model import ALL_REGISTERS, DEFAULT_USER_DATA, UserData, interned
from jfsync.sync.echo import PendingWrite
from jfsync.sync.ledger import combined, outbox
from jfsync.sync.ledger.batch import Applied, Batch, Observation, Outcome, Source, named_like
from jfsync.sync.ledger.cache import STATE_CACHE_PAIRS, CachedPair, StateCache
from jfsync.sync.ledger.clock import Clock
from jfsync.sync.ledger.codec import Key, Pair, fetch, mask_bits, ordered
from jfsync.sync.ledger.combined import PeerOutbox
from jfsync.sync.ledger.errors import LedgerError
from jfsync.sync.ledger.lock import WAL_AUTOCHECKPOINT_PAGES, LedgerFile
from jfsync.sync.ledger.maps import IdMaps, ItemMapping, migrate_map_keys
from jfsync.sync.ledger.outbox import OutboxRow, WorkRow
from jfsync.sync.ledger.policy import LedgerPolicy
from jfsync.sync.ledger.schema import (
    WriteGate,
    connect,
    migrate,
    prepare,
    run_on_thread,
    write_transaction,
)
from jfsync.sync.ledger.writer import StateWriter
from jfsync.sync.merge import CanonicalState, MergePolicy

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Observations from which :meth:`Ledger.apply_observations` writes its rows without SQLite
#: checking their foreign keys. Every id it writes is one the same transaction read or made
#: (users, items: :class:`~jfsync.sync.ledger.maps.IdMaps`; servers: registered at open, never
#: deleted), so the checks cannot fail there, and they were a fifth of SQLite's work for the
#: rows of a 10k message (a look-up of the user, the item and the server per row inserted).
#: ``check_invariants`` still runs ``PRAGMA foreign_key_check`` over the whole file.
BULK_UNCHECKED_MIN = 256

#: Nothing yet (the memos of a pusher round's loops compare by identity against it).
_UNSET = object()


@dataclass(frozen=True, slots=True)
class ResetHold:
    """A (server, user) held by the reset guard: the server showed that user's data wiped."""

    server: str
    #: The canonical user key.
    user: str
    #: The user's account name on that server, when known.
    name: str | None
    #: Items that went back to never-touched, of the ``known`` non-default ones.
    items: int
    known: int
    since_ms: int
    #: None while held; ``accept`` or ``restore`` once the operator decided (applied by the
    #: next catch-up of that user on that server).
    resolution: str | None


class Ledger:
    """The SQLite ledger; open with ``async with Ledger(path, policy) as ledger``.

    Everything that matters commits together: applying an observation runs the echo rule
    (:mod:`jfsync.sync.echo`), diffs against the origin's last-known state, stamps the change
    with the persisted hybrid clock, merges (:mod:`jfsync.sync.merge`), updates the canonical
    and last-known states and upserts the outbox rows of every server that has the user, in
    ONE transaction. A crash at any point therefore loses nothing that was committed and leaves
    nothing half-written; a redelivered write is harmless because the pusher skips targets
    that already hold the desired state.

    Sources: an observation is a websocket ``event`` (runs the echo rule and consumes pending
    states), a ``scan`` page (matches pending states without consuming them: a page can be
    older than a write made while scanning) or a ``compare`` read by the pusher (fresh: always
    diffed). An event equal to the state a write replaced was flushed before that write and is
    ignored as stale (see :mod:`jfsync.sync.echo`). When a user's socket (re)connects, call
    :meth:`forget_echoes` before the resync scan.

    Keys: servers are config names; users and items are *canonical keys* (strings). Identity
    resolution (server user/item id → canonical key) happens before the ledger; the id maps
    (:meth:`map_user`, :meth:`map_item`) store it, with type, path and provider ids so later
    matching strategies need no schema change. Until then callers use the server's ids as
    canonical keys. A server "has" a user when :meth:`map_user` recorded it; only those servers
    get outbox rows (the origin of an observation always may).

    Outbox: at most one row per (peer, user, item). It names the registers owed and the desired
    state (the canonical state when the row last changed); a newer change merges into it and
    bumps its ``version`` (a hybrid-clock value, unique over the ledger's life). Registers
    whose desired value already equals the peer's last-known state are pruned, so a row
    disappears when nothing is owed any more. A pusher uses it like this:

    1. ``rows = await ledger.due_rows(peer, limit, now_ms, exclude=in_flight_ids)``;
    2. read the target's current state, then ``row = await ledger.observe_before_write(row,
       current, now_ms)``: when the target differs from its last-known state (or jfsync has no
       history of it: first contact) the read state is applied as an observation first, so a
       change the event path has not delivered yet is merged instead of overwritten; the fresh
       row (or None when nothing is owed any more) comes back;
    3. ``await ledger.record_intents([(row, current, states)], now_ms)`` with every state the
       write may leave on the peer (after each of its requests), so that a write cut off by a
       crash is still recognised as jfsync's own afterwards;
    4. write ``row.registers`` of ``row.desired``, then ``await ledger.row_written(row,
       row.intended(current), now_ms)``. Pass the state the write was meant to produce
       (:meth:`OutboxRow.intended`), not the server's reply: a user change made between the
       read and the write then shows up in the echo as a real change instead of being taken
       for the echo. ``row_written`` records that state as pending echo and as last-known, and
       deletes the row only if its version is unchanged (a newer change that replaced it
       mid-flight stays queued);
    5. on failure ``row_failed(row, reason, retry_at_ms)`` (transient) or ``row_dead(row,
       reason)`` (400/404: parked, listed by :meth:`dead_rows`, revived by a newer change or
       :meth:`retry_dead`). After a down peer returns, :meth:`reset_backoff`.

    Steps 2 and 4 have batch forms (:meth:`observe_before_writes`, :meth:`rows_written`), and
    step 3 takes many rows, each in one transaction; use them under load.
    ``observe_before_writes(..., intents=...)`` does steps 2 and 3 in one transaction.

    Decoded state of recently used (user, item) pairs is kept between transactions in a bounded
    cache (:class:`~jfsync.sync.ledger.cache.StateCache`), filled and changed only by the
    transaction's :class:`~jfsync.sync.ledger.writer.StateWriter` once it commits, and emptied
    after a transaction that did not end normally. Rows are identified by (peer, user, item)
    and ``version``; the integer ``id`` is only a handle.

    Reset guard (:mod:`jfsync.sync.resetguard`): :meth:`rebase_last_known` takes what a server
    that lost a user's data now holds as its last-known state without merging it, and queues
    the canonical state for it; ``reset_holds`` rows (:meth:`hold_reset`,
    :meth:`resolve_reset_holds`) pause a (server, user): :meth:`due_rows` skips its rows until
    the hold is dropped. Each server's Jellyfin id is kept (:meth:`jellyfin_id`);
    :meth:`forget_server_history` makes a replaced server a first contact again.

    Config reload: :meth:`set_policy` puts a new merge policy (servers, ``mode: send`` and
    ``receive``, each person's register choices) in force from the next transaction on;
    :meth:`prune_outbox` then drops what queued rows it no longer allows, :meth:`mark_away`
    remembers servers taken out of the config and :meth:`rejoined` names those back in it,
    for which :meth:`requeue_differences` queues what changed meanwhile;
    :meth:`drop_unmapped_rows` drops rows of items a library filter now leaves out.

    All methods serialise on one lock; each transaction (and each read) is one call on the
    connection's thread, so none is held across anything but the ledger's own SQL and apply
    logic, and one whose caller is cancelled still ends whole (committed or rolled back)
    before the next begins. Tokens are stored in clear in the ledger file (protect the file)
    and never logged.

    The file: :meth:`open` refuses an existing file that is not an SQLite database (0 bytes
    included; :func:`~jfsync.sync.ledger.lock.check_ledger_file`) and records the file's device
    and inode; every write transaction first checks that the path still names that file
    (:meth:`verify_file`) and refuses to write into a file that was deleted or replaced
    (:class:`~jfsync.sync.ledger.errors.LedgerFileLostError`; ``file_lost_observers`` are told
    once). Opened with the config's ``users.map``, it moves people keyed by their entry's
    position (``map:0``) to the entry's stable key.
    """

    def __init__(
        self,
        path: str | Path,
        policy: MergePolicy,
        *,
        cache_pairs: int = STATE_CACHE_PAIRS,
        user_map: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        self._path = str(path)
        #: The policy in force: replaced whole by :meth:`set_policy`, never changed in place.
        self._policy = LedgerPolicy(policy)
        #: The config's users.map: with it, open() moves positional map keys to stable ones.
        self._user_map = user_map
        self._db: aiosqlite.Connection | None = None
        #: Every use of the connection holds its lock; writes go through its transactions.
        self._gate = WriteGate()
        self._file = LedgerFile(self._path)
        self._maps = IdMaps(cache_pairs)
        self._clock = Clock()
        self._cache = StateCache(cache_pairs)
        #: Told, once, why the ledger stopped taking writes (the service stops on it).
        self.file_lost_observers: list[Callable[[str], None]] = self._file.observers

    def __repr__(self) -> str:
        return f"Ledger({self._path!r}, open={self._db is not None})"

    # ------------------------------------------------------------------ lifecycle

    @property
    def policy(self) -> MergePolicy:
        """The merge policy this ledger applies."""
        return self._policy.merge

    @property
    def clock_ms(self) -> int:
        """The hybrid clock's last value (the latest stamp handed out)."""
        return self._clock.ms

    async def open(self) -> Self:
        """Connect, migrate the schema, register the configured servers, load the clock.

        An existing file that is not an SQLite database (0 bytes included) is refused
        (LedgerFileError); a missing one is created. The file's identity (device, inode) is
        recorded: every write transaction first checks that the path still names it
        (:meth:`verify_file`).
        """
        if self._db is not None:
            return self
        new_file = self._file.claim()
        try:
            db = await connect(self._path)
        except BaseException:
            self._file.release()
            raise
        try:
            if new_file:
                # It holds every user's token: the owner's only. SQLite creates the -wal and
                # -shm files (in prepare) with the mode of the database file.
                os.chmod(self._path, 0o600)
            if self._file.in_memory:
                await db.execute("PRAGMA foreign_keys=ON")
            else:
                await prepare(db)
                # Checkpoints run on a thread of their own (lock.WalCheckpointer); SQLite's
                # automatic one inside a commit is only the bound should that fall behind.
                await db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
                self._file.remember()
            applied = await migrate(db)
            if applied:
                logger.info("ledger %s: applied schema migrations %s", self._path, applied)
            await run_on_thread(db, self._start)
        except BaseException:
            await db.close()
            self._file.release()
            raise
        self._db = db
        return self

    def _start(self, conn: sqlite3.Connection) -> None:
        """What :meth:`open` does on the connection's thread once the schema is current."""

        def register(conn: sqlite3.Connection) -> None:
            self._maps.register_servers(conn, self.policy.servers)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('clock_ms', 0) ON CONFLICT DO NOTHING"
            )

        write_transaction(conn, register)
        if self._user_map is not None:
            migrate_map_keys(conn, self._path, self._user_map)
        self._maps.load_servers(conn)
        self._clock.load(conn)

    async def close(self) -> None:
        """Close the connection and give up the file (idempotent)."""
        db, self._db = self._db, None
        if db is not None:
            async with self._gate.lock:
                await db.close()
        self._file.release()

    def file_problem(self) -> str | None:
        """Why the file at the ledger path is not the file this ledger writes, or None.

        One ``os.stat``: the path must still name the file (device and inode) opened.
        """
        return self._file.problem()

    def verify_file(self) -> None:
        """Raise LedgerFileLostError when the path no longer names the file open.

        The first time, every :attr:`file_lost_observers` is told why; from then on every
        write is refused, even if the file comes back.
        """
        self._file.verify()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ identity maps

    async def map_user(
        self, server: str, remote_user_id: str, user: str, *, name: str | None = None
    ) -> None:
        """Record that ``remote_user_id`` on ``server`` is the canonical user ``user``."""
        sid = self._sid(server)
        await self._write(lambda tx: self._maps.map_user(tx.db, sid, remote_user_id, user, name))

    async def map_items(self, server: str, mappings: Iterable[ItemMapping]) -> None:
        """Record several server items as canonical items (replacing older mappings)."""
        entries = list(mappings)
        if not entries:
            return
        sid = self._sid(server)
        await self._write(lambda tx: self._maps.map_items(tx.db, sid, entries))

    async def map_item(
        self,
        server: str,
        remote_item_id: str,
        item: str,
        *,
        item_type: str | None = None,
        path: str | None = None,
        provider_ids: dict[str, str] | None = None,
    ) -> None:
        """Record that ``remote_item_id`` on ``server`` is the canonical item ``item``."""
        await self.map_items(
            server, [ItemMapping(remote_item_id, item, item_type, path, provider_ids)]
        )

    async def user_for(self, server: str, remote_user_id: str) -> str | None:
        """Return the canonical user of a server's user id, if mapped."""
        sid = self._sid(server)
        return await self._read(lambda tx: self._maps.user_for(tx.db, sid, remote_user_id))

    async def item_for(self, server: str, remote_item_id: str) -> str | None:
        """Return the canonical item of a server's item id, if mapped."""
        sid = self._sid(server)
        return await self._read(lambda tx: self._maps.item_for(tx.db, sid, remote_item_id))

    async def servers_with_user(self, user: str) -> list[str]:
        """Return the servers (config order) that have the canonical user ``user``."""
        names = await self._read(lambda tx: self._maps.servers_with_user(tx.db, user))
        return sorted(names, key=self.policy.rank)

    # ------------------------------------------------------------------ identity changes

    async def remap_items(
        self,
        server: str,
        *,
        mappings: Sequence[ItemMapping] = (),
        unmapped: Sequence[str] = (),
        forget: Sequence[str] = (),
        stage: Sequence[ItemMapping] = (),
        fresh_stage: bool = False,
        staged: int | None = None,
    ) -> None:
        """Change the server's item id map in ONE transaction, for identity matching.

        First what jfsync knew of ``server`` for the canonical items ``forget`` goes (every
        user's last-known state and pending echoes: the server item behind them changed or
        left, so the next observation there is a first contact); then the mappings of the
        server's ids ``unmapped`` are dropped; then ``mappings`` are recorded as
        :meth:`map_items` records them.

        ``stage`` mappings are only set aside (on this connection, outside the ledger file;
        ``fresh_stage`` first drops any an earlier call set aside and never recorded); with
        ``staged``, every mapping set aside for the server, which must then be ``staged`` in
        number (else :class:`LedgerError` and nothing changes), is recorded last, in one go.
        A first match sets the mappings of a server that has none aside as they come (in
        no order of that server's ids) and records them all in one transaction: each page of
        the id map is then written once, not once per few thousand mappings.
        """
        sid = self._sid(server)

        def work(tx: StateWriter) -> None:
            if forget:
                tx.forget_items_on(sid, forget)
            if unmapped:
                self._maps.unmap_items(tx.db, sid, unmapped)
            if mappings:
                self._maps.map_items(tx.db, sid, mappings)
            if stage or fresh_stage:
                self._maps.stage_items(tx.db, sid, stage, fresh=fresh_stage)
            if staged is not None:
                self._maps.map_staged(tx.db, sid, staged)

        await self._write(work)

    async def retire_items(self, items: Sequence[str]) -> list[str]:
        """Drop every trace of the canonical items among ``items`` that no server maps any more.

        Their canonical states, last-known states, pending echoes and outbox rows go (the keys
        stay: ids are never reused). Items that some server still maps are left alone. Returns
        the keys retired.
        """

        def work(tx: StateWriter) -> list[tuple[int, str]]:
            unmapped = self._maps.unmapped_items(tx.db, items)
            if unmapped:
                tx.retire([iid for iid, _ in unmapped])
            return unmapped

        return [key for _, key in await self._write(work)]

    async def backfill_mapped(self, server: str, user: str, wall_ms: int) -> int:
        """Do :meth:`backfill`, but only for canonical items that ``server`` maps (has).

        With an identity that maps every item a server has, this queues nothing for items the
        server lacks (they would only be parked as not found). Returns the rows touched.
        """
        return await self.backfill(server, user, wall_ms, only_mapped=True)

    # ------------------------------------------------------------------ observations

    async def apply_observation(
        self,
        server: str,
        user: str,
        item: str,
        incoming: UserData,
        wall_ms: int,
        *,
        source: Source = "event",
        read_seq: int | None = None,
    ) -> Applied:
        """Apply one observed state in one transaction; see :meth:`apply_observations`."""
        applied = await self.apply_observations(
            [Observation(server, user, item, incoming, wall_ms, source, read_seq)]
        )
        return applied[0]

    async def apply_observations(
        self,
        observations: Sequence[Observation],
        *,
        due: dict[str, list[OutboxRow]] | None = None,
        due_limit: int = 0,
    ) -> list[Applied]:
        """Apply observations in order, all in ONE transaction, and report each outcome.

        Per observation: the echo rule (events consume pending echoes; reads only match
        them), the diff against the origin's last-known state, a hybrid-clock stamp when
        something changed, the merge, the new canonical and last-known states, and the outbox
        rows of the origin and of every server that has the user.

        With ``due`` (a dict to fill), the same transaction then reads, for each peer this
        apply queued something for, the rows :meth:`due_rows` would return for it at the
        observations' time (up to ``due_limit``; the first observation's ``wall_ms``): a
        pusher woken for a live change starts from them without a hop of its own.
        """
        if not observations:
            return []
        observed = list(observations)
        sids = {name: self._sid(name) for name in {o.server for o in observed}}
        due_ms = observed[0].wall_ms

        def work(tx: StateWriter) -> list[Applied]:
            db = tx.db
            batch = self._batch(tx)
            created: set[int] = set()
            user_keys = [o.user for o in observed]
            item_keys = [o.item for o in observed]
            users = self._maps.ensure_ids(db, "users", user_keys, created)
            new_users = set(created)
            created.clear()
            items = self._maps.ensure_ids(db, "items", item_keys, created)
            # (Columns zipped in C: a tuple each, no Python frame per observation.)
            uids = list(map(users.__getitem__, user_keys))
            iids = list(map(items.__getitem__, item_keys))
            sid_of = [sids[o.server] for o in observed]
            keys = list(zip(uids, iids, sid_of, strict=True))
            pair_of = list(zip(uids, iids, strict=True))  # (shared with the batch: built once)
            # In the order first observed (an ordered set): the pairs' cached entries are
            # then taken, and a new item's made, in that order, and the observations that
            # follow in the same order find them one after the other in memory, not at random
            # (a third off taking 10k cached pairs, a tenth off applying them).
            pairs = dict.fromkeys(pair_of).keys()
            empty = (
                {(u, i) for u, i in pairs if u in new_users or i in created}
                if new_users or created
                else set()
            )
            batch.load(pairs, empty=empty)
            results = batch.apply_all(observed, keys, pair_of)
            batch.flush()
            if due is not None:
                peers = {peer for r in results for peer, regs in r.queued.items() if regs}
                names = self._maps.names
                for peer in sorted(peers):
                    sid = self._maps.sid_of(peer)
                    if sid is not None:
                        due[peer] = outbox.due(db, names, sid, due_limit, due_ms, ())
            return results

        return await self._write(work, checked=len(observed) < BULK_UNCHECKED_MIN)

    async def observe_before_write(
        self, row: OutboxRow, current: UserData, wall_ms: int
    ) -> OutboxRow | None:
        """Merge the target's freshly read state first when it is news; return the fresh row.

        When ``current`` equals the peer's last-known state nothing happens. Otherwise (the
        target changed behind the event path, or jfsync has no history of it) ``current`` is
        applied as a ``compare`` observation of the peer, in one transaction. Returns the row
        as it now stands, or None when nothing is owed to the peer any more.
        """
        return (await self.observe_before_writes([(row, current)], wall_ms))[0]

    async def observe_before_writes(
        self,
        reads: Sequence[tuple[OutboxRow, UserData]],
        wall_ms: int,
        *,
        intents: Callable[[OutboxRow, UserData], Sequence[UserData]] | None = None,
        read_ms: int | None = None,
        read_seq: int | None = None,
        regressed: list[OutboxRow] | None = None,
    ) -> list[OutboxRow | None]:
        """Do :meth:`observe_before_write` for several rows in ONE transaction.

        ``read_ms`` is when the peer's states were requested (default ``wall_ms``) and
        ``read_seq`` the :meth:`ticket` taken just before (None: taken as fresh). A row whose
        key the ledger learnt something of after that (an event, a write) while the read
        differs from its last-known state gets None: the read is outdated, so it is neither
        applied nor written over; the row stays due and is read again next round.

        With ``regressed`` (a list to fill), a read showing an item back to never-touched
        while the ledger knows it had data there is not applied either: that is what a server
        that lost its data shows, and only the catch-up scan of that user, which sees all of
        the user's items at once, can tell a lost server from the user's own edit (the reset
        guard). Such rows get None and are added to ``regressed``; the caller defers them and
        asks for that catch-up.

        With ``intents``, the same transaction also records, for every row still owed, the
        states its write will leave on the peer (``intents(fresh_row, current)``), as
        :meth:`record_intents` does.
        """
        if not reads:
            return []
        asked_ms = wall_ms if read_ms is None else read_ms
        asked_seq = self.ticket() if read_seq is None else read_seq
        synced = self.policy.synced
        found: list[OutboxRow] = []

        def work(tx: StateWriter) -> list[OutboxRow | None]:
            keys = self._maps.row_keys(tx.db, [row for row, _ in reads])
            batch = self._batch(tx)
            currents = [interned(read) for _, read in reads]
            entries, quick, slow = _split_known(tx, keys, currents)
            fresh: list[OutboxRow | None] = [None] * len(reads)
            # A read equal to what the ledger knows (nearly every read of a burst) changes
            # nothing: decided from the pair as loaded, without the batch's working set.
            echoes: dict[Key, tuple[PendingWrite, ...]] = {}
            batch.see_many([keys[index] for index in quick], asked_seq)
            # The last intent made, by what it was made of (a round's rows mostly share it).
            last_old: object = _UNSET
            last_current: object = _UNSET
            last_step: object = _UNSET
            last_made: tuple[PendingWrite, ...] = ()
            for index in quick:
                key = keys[index]
                row, current = reads[index][0], currents[index]
                entry = entries[key[:2]]
                work_row = entry.rows.get(key)
                if work_row is None:
                    continue
                still = fresh[index] = named_like(work_row, row)
                if intents is None:
                    continue
                old = entry.echo.get(key, ())
                steps = intents(still, current)
                if len(steps) == 1:
                    step = interned(steps[0])
                    if old is not last_old or current is not last_current or step is not last_step:
                        last_old, last_current, last_step = old, current, step
                        last_made = batch.with_write(old, step, wall_ms, current)
                    echoes[key] = last_made
                    continue
                pending = old
                for state in steps:
                    pending = batch.with_write(pending, interned(state), wall_ms, current)
                echoes[key] = pending
            if slow:
                pairs = {keys[index][:2] for index in slow}
                batch.load_entries({pair: entries[pair] for pair in pairs})
                # Which servers have the users (and map the items) only matters to a read
                # that differs.
                members = False
                outdated: set[Key] = set()
                lk = batch.lk
                for index in slow:
                    row, key, current = reads[index][0], keys[index], currents[index]
                    known = lk.get(key)
                    if known is current or known == current:
                        batch.see(key, asked_seq)
                        continue
                    if (
                        regressed is not None
                        and known is not None
                        and batch.seen_seq(key) <= asked_seq  # an outdated read proves nothing
                        and not current.holds_data(synced)
                        and known.holds_data(synced)
                    ):
                        outdated.add(key)
                        found.append(row)
                        continue
                    obs = Observation(
                        row.peer, row.user, row.item, current, asked_ms, "compare", asked_seq
                    )
                    if not members:
                        batch.load_members(pairs)
                        members = True
                    if batch.apply(obs, key).outcome is Outcome.OUTDATED:
                        outdated.add(key)
                batch.number_new_rows()
                for index in slow:
                    key = keys[index]
                    if key not in outdated:
                        fresh[index] = batch.outbox_row(key, reads[index][0])
                if intents is not None:
                    for index in slow:
                        owed = fresh[index]
                        if owed is not None:
                            current = currents[index]
                            batch.record_intents(
                                keys[index], current, intents(owed, current), wall_ms
                            )
            batch.flush()
            if echoes:
                tx.put_echoes(echoes)
            return fresh

        fresh = await self._write(work)
        if regressed is not None:
            regressed.extend(found)  # only once committed, on the caller's thread
        return fresh

    async def backfill(
        self, server: str, user: str, wall_ms: int, *, only_mapped: bool = False
    ) -> int:
        """Queue, for ``server``, every non-default canonical item of ``user`` it has no history of.

        Call it when a server (or a user on it) joins; the pusher's compare-before-write then
        merges whatever the server holds at first contact. With ``only_mapped`` only items the
        server maps (has) are queued. Returns the rows touched.
        """
        sid = self._sid(server)

        def work(tx: StateWriter) -> int:
            uid = self._maps.user_id(tx.db, user)
            pairs = tx.unknown_to(sid, uid, only_mapped=only_mapped)
            if not pairs:
                return 0
            return self._queue_unknown(tx, sid, pairs, wall_ms)

        return await self._write(work)

    def _queue_unknown(self, tx: StateWriter, sid: int, pairs: set[Pair], wall_ms: int) -> int:
        """Queue, for server ``sid``, the non-default registers of ``pairs`` (items it has no
        history of), on SQLite's thread inside ``tx``; return the rows touched."""
        synced = self.policy.synced
        batch = self._batch(tx)
        batch.load(pairs)
        version = batch.tick(wall_ms)
        touched = 0
        for pair in sorted(pairs):
            canonical = batch.canon[pair]
            owed = frozenset(r for r in synced if canonical.data.get(r) != DEFAULT_USER_DATA.get(r))
            if owed and batch.refresh_row((*pair, sid), owed, canonical.data, version, wall_ms):
                touched += 1
        batch.flush()
        return touched

    # ------------------------------------------------------------------ reads

    async def canonical(self, user: str, item: str) -> CanonicalState | None:
        """Return the canonical state of ``user`` and ``item``, if any."""

        def work(tx: StateWriter) -> CanonicalState | None:
            pair = self._maps.pair(tx.db, user, item)
            if pair is None:
                return None
            batch = self._batch(tx)
            batch.load({pair}, with_members=False)
            return batch.canon.get(pair)

        return await self._read(work)

    async def last_known(self, server: str, user: str, item: str) -> UserData | None:
        """Return the state jfsync last knew ``server`` to hold for ``user`` and ``item``."""
        sid = self._sid(server)

        def work(tx: StateWriter) -> UserData | None:
            pair = self._maps.pair(tx.db, user, item)
            return None if pair is None else tx.last_known((*pair, sid))

        return await self._read(work)

    async def last_known_for_user(self, server: str, user: str) -> dict[str, UserData]:
        """Return every last-known state of ``user`` on ``server``, by canonical item, in one
        read (a catch-up reads them a page at a time instead: :meth:`last_known_page`)."""
        sid = self._sid(server)
        return await self._read(lambda tx: tx.last_known_for(sid, user))

    async def pending_echoes(self, server: str, user: str, item: str) -> tuple[PendingWrite, ...]:
        """Return the writes to ``server`` whose echo is still expected."""
        sid = self._sid(server)

        def work(tx: StateWriter) -> tuple[PendingWrite, ...]:
            pair = self._maps.pair(tx.db, user, item)
            return () if pair is None else tx.pending_echoes((*pair, sid))

        return await self._read(work)

    async def forget_echoes(self, server: str, user: str) -> int:
        """Drop every pending echo of ``user`` on ``server``; return how many keys had some.

        Call it when that user's socket (re)connects, before the resync scan: events of the old
        socket can no longer arrive, so pending states would only risk swallowing a real change.
        """
        sid = self._sid(server)
        return await self._write(lambda tx: tx.forget_echoes(sid, user))

    # ------------------------------------------------------------------ outbox

    async def due_rows(
        self,
        peer: str,
        limit: int,
        now_ms: int,
        *,
        exclude: Iterable[int] = (),
    ) -> list[OutboxRow]:
        """Return up to ``limit`` live rows for ``peer`` due at ``now_ms``, oldest due first.

        ``exclude`` holds the ids of rows the caller already has in flight. SQLite skips them
        (up to a chunk of them; any more are skipped here), so they cost no reading.
        """
        sid = self._sid(peer)
        skip = list(exclude)
        names = self._maps.names
        return await self._read(lambda tx: outbox.due(tx.db, names, sid, limit, now_ms, skip))

    async def get_row(self, peer: str, user: str, item: str) -> OutboxRow | None:
        """Return the outbox row for ``peer``, ``user`` and ``item``, live or dead."""
        sid = self._sid(peer)

        def work(tx: StateWriter) -> OutboxRow | None:
            pair = self._maps.pair(tx.db, user, item)
            if pair is None:
                return None
            key = (*pair, sid)
            return outbox.rows_at(tx.db, self._maps.names, [key]).get(key)

        return await self._read(work)

    async def row_written(self, row: OutboxRow, written_state: UserData, wall_ms: int) -> bool:
        """Record a successful write of ``row``; return whether the row is done.

        ``written_state`` becomes a pending echo and the peer's last-known state. The row is
        deleted only if its version is still ``row.version``; a row replaced mid-flight by a
        newer change stays (minus the registers the write already brought to their desired
        value) and False is returned.
        """
        return (await self.rows_written([(row, written_state)], wall_ms))[0]

    async def record_intents(
        self, intents: Sequence[tuple[OutboxRow, UserData, Sequence[UserData]]], wall_ms: int
    ) -> None:
        """Before writing, record every state each write may leave on its peer, in ONE tx.

        Each ``(row, base, states)`` adds ``states`` (the peer's state after each request of
        the write, in order) as pending echoes that replace ``base``. Should jfsync stop
        before :meth:`rows_written` records the write, the state then found on the peer is
        still known to be jfsync's own, even if the row has since been replaced by a newer
        change; and the echo of a write cut half-way is recognised. The ack later replaces
        the entry of the state written with one timed at the ack.
        """
        if not intents:
            return

        def work(tx: StateWriter) -> None:
            keys = self._maps.row_keys(tx.db, [row for row, _, _ in intents])
            batch = self._batch(tx)
            batch.load({(u, i) for u, i, _ in keys}, with_members=False)
            for (_, base, states), key in zip(intents, keys, strict=True):
                batch.record_intents(key, base, states, wall_ms)
            batch.flush()

        await self._write(work)

    async def rows_written(
        self, acks: Sequence[tuple[OutboxRow, UserData]], wall_ms: int
    ) -> list[bool]:
        """Do :meth:`row_written` for several rows in ONE transaction."""
        if not acks:
            return []

        def work(tx: StateWriter) -> list[bool]:
            keys = self._maps.row_keys(tx.db, [row for row, _ in acks])
            batch = self._batch(tx)
            # Shared: a batch of acks mostly writes one state, whose encodes, compares and
            # prunes then go by identity (each ack's state is a new object on the event loop).
            states = [interned(state) for _, state in acks]
            entries, quick, slow = _split_acks(tx, keys, acks, states)
            done = [False] * len(acks)
            if slow:
                batch.load_entries({keys[index][:2]: entries[keys[index][:2]] for index in slow})
                for index in slow:
                    done[index] = batch.written(
                        keys[index], acks[index][0].version, states[index], wall_ms
                    )
            # The usual ack (its row still the one written, or gone; the canonical value the
            # one written): its last-known state, its echo and the row's delete, decided from
            # the pair as loaded (what Batch.written does on that path).
            known: dict[Key, UserData] = {}
            echoes: dict[Key, tuple[PendingWrite, ...]] = {}
            rows: dict[Key, WorkRow | None] = {}
            # The last echo list made, by what it was made of (a round's acks mostly share it).
            last_old: object = _UNSET
            last_state: object = _UNSET
            last_replaced: object = _UNSET
            last_made: tuple[PendingWrite, ...] = ()
            for index in quick:
                key, state = keys[index], states[index]
                entry = entries[key[:2]]
                replaced = entry.lk.get(key)
                known[key] = state
                batch.see_write(key)
                old = entry.echo.get(key, ())
                if old is not last_old or state is not last_state or replaced is not last_replaced:
                    last_old, last_state, last_replaced = old, state, replaced
                    last_made = batch.with_write(
                        batch.without(old, state), state, wall_ms, replaced
                    )
                echoes[key] = last_made
                if entry.rows.get(key) is not None:
                    rows[key] = None
                    done[index] = True
            batch.flush()
            if known:
                tx.put_last_known(dict(sorted(known.items())))
                tx.put_echoes(dict(sorted(echoes.items())))
            if rows:
                tx.put_rows(rows)
            return done

        return await self._write(work)

    async def row_failed(self, row: OutboxRow, reason: str, retry_at_ms: int) -> None:
        """Record a failed attempt of ``row`` and when to try again (the row stays live)."""
        await self.rows_failed([row], reason, retry_at_ms)

    async def rows_failed(self, rows: Sequence[OutboxRow], reason: str, retry_at_ms: int) -> None:
        """Do :meth:`row_failed` for several rows with one reason, in ONE transaction."""
        if not rows:
            return

        def work(tx: StateWriter) -> None:
            failed = [(row.id, self._maps.known_pair(row.user, row.item)) for row in rows]
            tx.fail_rows(failed, reason, retry_at_ms)

        await self._write(work)

    async def row_dead(self, row: OutboxRow, reason: str) -> bool:
        """Park ``row`` as dead with ``reason``; False when a newer change replaced it (or it
        was parked already)."""

        def work(tx: StateWriter) -> bool:
            pair = self._maps.known_pair(row.user, row.item)
            return tx.park_row(row.id, row.version, reason, pair)

        parked = await self._write(work)
        if parked:
            logger.warning("[%s] parked write of %s/%s: %s", row.peer, row.user, row.item, reason)
        return parked

    async def retry_dead(self, peer: str) -> int:
        """Make every dead row of ``peer`` live and due now; return how many."""
        sid = self._sid(peer)
        return await self._write(lambda tx: tx.revive_dead(sid))

    async def reset_backoff(self, peer: str) -> int:
        """Make every live row of ``peer`` due now (after the peer came back); return how many."""
        sid = self._sid(peer)
        return await self._write(lambda tx: tx.reset_backoff(sid))

    async def outbox_depth(self, peer: str) -> int:
        """Return how many live rows ``peer`` has queued."""
        sid = self._sid(peer)
        return await self._read(lambda tx: outbox.depth(tx.db, sid))

    async def oldest_age(self, peer: str, now_ms: int) -> float | None:
        """Return the age in seconds of the oldest live row of ``peer``, or None when empty."""
        sid = self._sid(peer)
        oldest = await self._read(lambda tx: outbox.oldest_created_ms(tx.db, sid))
        return None if oldest is None else max(0.0, (now_ms - oldest) / 1000.0)

    async def dead_rows(self, peer: str) -> list[OutboxRow]:
        """Return the parked rows of ``peer`` with their reasons (``last_error``)."""
        sid = self._sid(peer)
        return await self._read(lambda tx: outbox.dead(tx.db, self._maps.names, sid))

    async def dead_summary(self, peer: str, limit: int) -> tuple[int, list[OutboxRow]]:
        """Return how many rows of ``peer`` are dead, and the oldest ``limit`` of them."""
        sid = self._sid(peer)

        def work(tx: StateWriter) -> tuple[int, list[OutboxRow]]:
            count = outbox.dead_count(tx.db, sid)
            return count, outbox.dead(tx.db, self._maps.names, sid, limit)

        return await self._read(work)

    # ------------------------------------------------------------------ policy (config reload)

    async def set_policy(self, policy: MergePolicy) -> None:
        """Apply a new merge policy from the next transaction on (a config reload).

        Servers it names that the ledger does not know yet are registered; the people with
        register choices of their own get their ids. Rows already queued are left as they
        are: :meth:`prune_outbox` brings them in line.
        """

        def work(tx: StateWriter) -> dict[str, int]:
            ids = self._maps.ensure_ids(tx.db, "users", [u for u, _ in policy.user_fields])
            self._maps.configure_servers(tx.db, policy.servers)
            return ids

        ids = await self._write(work)
        self._policy = LedgerPolicy(policy, {ids[u]: fields for u, fields in policy.user_fields})

    async def prune_outbox(self) -> dict[str, int]:
        """Bring queued rows in line with the policy; return rows dropped per peer.

        Rows owed to servers no longer configured, or with ``mode: send``, are dropped whole;
        registers no longer synced (for everyone, or for that person) are taken out of the
        others, and a row left with none is dropped.
        """
        rules = self._policy

        def work(tx: StateWriter) -> dict[str, int]:
            dropped: dict[str, int] = {}
            configured = set(rules.merge.servers)
            names = self._maps.names
            narrowed: list[tuple[int, Key, int]] = []
            for rid, key, bits in outbox.registers_owed(tx.db):
                name = names.get(key[2], str(key[2]))
                allowed = mask_bits(rules.synced_of(key[0], name)) if name in configured else 0
                left = bits & allowed
                if left == bits:
                    continue
                narrowed.append((rid, key, left))
                if left == 0:
                    dropped[name] = dropped.get(name, 0) + 1
            tx.narrow_rows(narrowed)
            return dropped

        return await self._write(work)

    async def mark_away(self) -> list[str]:
        """Remember every server with history that the policy no longer names; return them.

        While away it is owed nothing, so when it comes back (:meth:`rejoined`) what changed
        meanwhile must be queued for it again (:meth:`requeue_differences`).
        """
        configured = set(self.policy.servers)

        def work(tx: StateWriter) -> list[str]:
            away = sorted(n for n in tx.servers_with_history() if n not in configured)
            tx.db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, 0) ON CONFLICT DO NOTHING",
                [(f"away:{name}",) for name in away],
            )
            return away

        return await self._write(work)

    async def rejoined(self) -> list[str]:
        """Configured servers that were away (removed from the config) since last caught up."""
        rows = await self._read(
            lambda tx: fetch(tx.db, "SELECT key FROM meta WHERE key LIKE 'away:%'")
        )
        names = {str(r[0]).removeprefix("away:") for r in rows}
        return [n for n in self.policy.servers if n in names]

    async def requeue_differences(self, server: str, wall_ms: int) -> int:
        """Queue for ``server`` every synced register its last-known state differs from the
        canonical one in (it was away, or only sent); return the rows touched."""
        sid = self._sid(server)

        def work(tx: StateWriter) -> int:
            pairs = tx.known_on(sid)
            touched = 0
            if pairs:
                batch = self._batch(tx)
                batch.load(pairs)
                version = batch.tick(wall_ms)
                for pair in sorted(pairs):
                    canonical = batch.canon.get(pair)
                    known = batch.lk.get((*pair, sid))
                    if canonical is None or known is None:
                        continue
                    owed = frozenset(
                        r for r in ALL_REGISTERS if canonical.data.get(r) != known.get(r)
                    )
                    if owed and batch.refresh_row(
                        (*pair, sid), owed, canonical.data, version, wall_ms
                    ):
                        touched += 1
                batch.flush()
            tx.db.execute("DELETE FROM meta WHERE key=?", (f"away:{server}",))
            return touched

        return await self._write(work)

    async def drop_unmapped_rows(self, peer: str) -> int:
        """Drop rows owed to ``peer`` for items its library index no longer maps (a library
        filter left them out); return how many. Without an index for ``peer``, nothing."""
        sid = self._sid(peer)

        def work(tx: StateWriter) -> int:
            if not self._maps.has_index(tx.db, sid):
                return 0
            rows = outbox.unmapped(tx.db, sid)
            tx.narrow_rows([(rid, key, 0) for rid, key in rows])
            return len(rows)

        return await self._write(work)

    # ------------------------------------------------------------------ reset guard

    async def jellyfin_id(self, server: str) -> str | None:
        """Return the Jellyfin server id last seen under the config name ``server``."""
        sid = self._sid(server)
        rows = await self._read(
            lambda tx: fetch(tx.db, "SELECT jellyfin_id FROM servers WHERE id=?", (sid,))
        )
        return next((None if r[0] is None else str(r[0]) for r in rows), None)

    async def remember_jellyfin_id(self, server: str, jellyfin_id: str) -> None:
        """Record the Jellyfin server id seen under the config name ``server``."""
        sid = self._sid(server)
        await self._write(
            lambda tx: tx.db.execute(
                "UPDATE servers SET jellyfin_id=? WHERE id=?", (jellyfin_id, sid)
            )
        )

    async def forget_server_history(self, server: str) -> int:
        """Forget what jfsync knew ``server`` to hold, for every user, in ONE transaction.

        Its last-known states, pending echoes and reset holds go; canonical states, id maps and
        queued rows stay. Every item it shows next is a first contact (merged, never taken as
        an edit). Returns how many last-known states were dropped.
        """
        sid = self._sid(server)

        def work(tx: StateWriter) -> int:
            dropped = tx.forget_server(sid)
            tx.db.execute("DELETE FROM reset_holds WHERE server=?", (sid,))
            return dropped

        return await self._write(work)

    async def rebase_last_known(
        self, server: str, user: str, states: Mapping[str, UserData], wall_ms: int
    ) -> int:
        """Take ``states`` as what ``server`` holds for ``user`` WITHOUT merging them, in one tx.

        For a server that lost its data (the reset guard's ``restore``): each state becomes the
        server's last-known state, and the canonical value of every synced register where it
        differs is queued for the server, so the pusher writes the canonical state back (its
        compare then finds the server as recorded, not changed). Returns the rows queued.
        """
        if not states:
            return 0
        sid = self._sid(server)
        synced = self.policy.synced
        given = dict(states)

        def work(tx: StateWriter) -> int:
            uid = self._maps.user_id(tx.db, user)
            items = self._maps.ensure_ids(tx.db, "items", list(given))
            batch = self._batch(tx)
            batch.load({(uid, iid) for iid in items.values()})
            version = batch.tick(wall_ms)
            queued = 0
            for item in sorted(given):
                state = given[item]
                key = (uid, items[item], sid)
                batch.set_last_known(key, state)
                canonical = batch.canon.get(key[:2])
                if canonical is None:
                    continue
                owed = frozenset(r for r in synced if canonical.data.get(r) != state.get(r))
                if owed and batch.refresh_row(key, owed, canonical.data, version, wall_ms):
                    queued += 1
            batch.flush()
            return queued

        return await self._write(work)

    async def reset_holds(self) -> list[ResetHold]:
        """Return every (server, user) the reset guard holds, oldest first."""
        rows = await self._read(
            lambda tx: fetch(
                tx.db,
                "SELECT h.server, u.key, su.name, h.items, h.known, h.since_ms, h.resolution "
                "FROM reset_holds h JOIN users u ON u.id = h.user "
                "LEFT JOIN server_users su ON su.server = h.server AND su.user = h.user "
                "ORDER BY h.since_ms, h.server, u.key",
            )
        )
        names = self._maps.names
        return [
            ResetHold(
                server=names[int(r[0])],
                user=str(r[1]),
                name=None if r[2] is None else str(r[2]),
                items=int(r[3]),
                known=int(r[4]),
                since_ms=int(r[5]),
                resolution=None if r[6] is None else str(r[6]),
            )
            for r in rows
            if int(r[0]) in names
        ]

    async def hold_reset(
        self, server: str, user: str, *, items: int, known: int, since_ms: int
    ) -> None:
        """Hold ``user`` on ``server``: nothing is delivered to it until a resolution."""
        sid = self._sid(server)

        def work(tx: StateWriter) -> None:
            uid = self._maps.user_id(tx.db, user)
            tx.db.execute(
                "INSERT INTO reset_holds(server, user, items, known, since_ms, resolution) "
                "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(server, user) DO NOTHING",
                (sid, uid, items, known, since_ms),
            )

        await self._write(work)

    async def resolve_reset_holds(
        self, server: str, user: str | None, resolution: Literal["accept", "restore"]
    ) -> list[ResetHold]:
        """Record the operator's decision on the holds of ``server`` (one user, or all).

        ``user`` is a canonical key or the user's account name on that server (any case).
        Returns the holds decided (empty when none matched). The next catch-up of each
        applies the decision and drops the hold (:meth:`drop_reset_hold`).
        """
        held = [h for h in await self.reset_holds() if h.server == server]
        if user is not None:
            wanted = user.casefold()
            held = [
                h
                for h in held
                if h.user == user or (h.name is not None and h.name.casefold() == wanted)
            ]
        if not held:
            return []
        sid = self._sid(server)
        await self._write(
            lambda tx: tx.db.executemany(
                "UPDATE reset_holds SET resolution=? WHERE server=? AND user="
                "(SELECT id FROM users WHERE key=?)",
                [(resolution, sid, hold.user) for hold in held],
            )
        )
        return [replace(h, resolution=resolution) for h in held]

    async def drop_reset_hold(self, server: str, user: str) -> bool:
        """Drop the hold of ``user`` on ``server`` (its resolution was applied)."""
        sid = self._sid(server)

        def work(tx: StateWriter) -> bool:
            cursor = tx.db.execute(
                "DELETE FROM reset_holds WHERE server=? "
                "AND user=(SELECT id FROM users WHERE key=?)",
                (sid, user),
            )
            return cursor.rowcount == 1

        return await self._write(work)

    # ------------------------------------------------------------------ tokens (TokenStore)

    async def load_token(self, server_id: str, user_id: str) -> str | None:
        """Return the stored token of a user on a server, if any."""
        rows = await self._read(
            lambda tx: fetch(
                tx.db, "SELECT token FROM tokens WHERE server=? AND user=?", (server_id, user_id)
            )
        )
        return next((str(r[0]) for r in rows), None)

    async def save_token(self, server_id: str, user_id: str, token: str) -> None:
        """Store (or replace) the token of a user on a server."""
        await self._write(
            lambda tx: tx.db.execute(
                "INSERT OR REPLACE INTO tokens(server, user, token) VALUES (?, ?, ?)",
                (server_id, user_id, token),
            )
        )

    async def forget_token(self, server_id: str, user_id: str) -> None:
        """Delete the stored token of a user on a server."""
        await self._write(
            lambda tx: tx.db.execute(
                "DELETE FROM tokens WHERE server=? AND user=?", (server_id, user_id)
            )
        )

    # ------------------------------------------------------------------ checks

    async def check_invariants(self) -> list[str]:
        """Return every broken ledger invariant as a readable line (empty when sound).

        Checked: SQLite integrity and foreign keys; the clock is at or after every stamp and
        row version; every outbox row owes at least one synced register; and for every server
        that has the user and a last-known state, each register that person syncs to it (none
        for a send-only server; a receive-only one keeps its own edits, and an indexed server
        that does not map the item is owed nothing of it, so neither is checked) either equals
        the canonical value or is owed by that server's outbox row with the canonical value.
        """
        rules = self._policy
        configured = {
            self._sid(n) for n in rules.merge.servers if n not in rules.merge.receive_only
        }
        return await self._read(lambda tx: self._problems(tx.db, rules, configured))

    def _problems(
        self, db: sqlite3.Connection, rules: LedgerPolicy, configured: set[int]
    ) -> list[str]:
        """:meth:`check_invariants` on the connection's thread, from the file itself."""
        problems: list[str] = []
        integrity = [str(r[0]) for r in fetch(db, "PRAGMA integrity_check")]
        if integrity != ["ok"]:
            problems.append(f"integrity_check: {integrity}")
        fk = fetch(db, "PRAGMA foreign_key_check")
        if fk:
            problems.append(f"foreign_key_check: {len(fk)} rows")
        clock = int(fetch(db, "SELECT value FROM meta WHERE key='clock_ms'")[0][0])
        highest = fetch(
            db,
            "SELECT MAX(m) FROM (SELECT MAX(favorite_ms, rating_ms, play_state_ms) "
            "AS m FROM canonical UNION ALL SELECT MAX(version) FROM outbox)",
        )[0][0]
        if highest is not None and int(highest) > clock:
            problems.append(f"clock {clock} is behind a stored stamp {highest}")
        synced_bits = mask_bits(rules.merge.synced)
        for rid, bits in fetch(db, "SELECT id, registers FROM outbox"):
            if int(bits) == 0 or int(bits) & ~synced_bits:
                problems.append(f"outbox row {rid} has registers {bits}")
        # From the file itself, not the cache nor the cached mappings.
        batch = Batch(rules, self._maps, self._clock, StateWriter(db, None, writable=False))
        pairs = {(int(u), int(i)) for u, i in fetch(db, "SELECT user, item FROM canonical")}
        batch.load(pairs)
        names = self._maps.names
        for (uid, iid), canonical in sorted(batch.canon.items()):
            for sid in sorted(batch.members.get(uid, set()) & configured):
                known = batch.lk.get((uid, iid, sid))
                if known is None or batch.lacks_item(sid, iid):
                    continue
                row = batch.rows.get((uid, iid, sid))
                for register in ordered(rules.synced_of(uid, names[sid])):
                    want = canonical.data.get(register)
                    if known.get(register) == want:
                        continue
                    if row is None or register not in row.mask or row.desired.get(register) != want:
                        problems.append(
                            f"{names[sid]} user#{uid} item#{iid}: {register} "
                            f"is {known.get(register)!r}, canonical {want!r}, not queued"
                        )
        return problems

    # ------------------------------------------------------------------ internals

    def ticket(self) -> int:
        """A number larger than every one handed out before: take one just before a read is
        requested and pass it as the read's ``read_seq``."""
        return self._clock.ticket()

    async def _read(self, work: Callable[[StateWriter], T]) -> T:
        """Run ``work`` on the connection's thread outside a transaction, in ONE hop: reads
        only (the cache takes what they read of the cached tables, once they returned, on
        that thread and under the gate lock: see :meth:`_write`)."""
        db = self._require()
        cache = self._cache

        def body(conn: sqlite3.Connection) -> T:
            tables = StateWriter(conn, cache, writable=False)
            result = work(tables)
            tables.commit()
            return result

        async with self._gate.lock:
            return await run_on_thread(db, body)

    async def _write(self, work: Callable[[StateWriter], T], *, checked: bool = True) -> T:
        """Run ``work`` in ONE write transaction, in ONE hop to the connection's thread.

        BEGIN IMMEDIATE, ``work`` (its reads, the apply logic, its writes) and COMMIT run as
        one function there (:func:`~jfsync.sync.ledger.schema.write_transaction`), which rolls
        back on any failure. Once COMMIT returned, still on that thread and in the same call,
        the transaction's writer gives the cache what it read and wrote (a burst's ~30,000
        fresh objects cost the event loop nothing). The cache is touched only inside such
        calls, which run one at a time on the connection's thread under the gate lock, so no
        read of it can race that update. When the transaction failed or its caller was
        cancelled (the call still ran to its end: committed or rolled back), the cache and
        the id maps forget what they held instead.

        ``checked`` False: SQLite does not check the foreign keys of the rows ``work`` writes
        (:data:`BULK_UNCHECKED_MIN`); they are on again once the transaction has ended, either
        way.
        """
        db = self._require()
        cache = self._cache

        def body(conn: sqlite3.Connection) -> T:
            tables = StateWriter(conn, cache)
            if checked:
                result = write_transaction(conn, work=lambda _: work(tables))
            else:
                # (A no-op inside a transaction: set before BEGIN, reset after its end.)
                conn.execute("PRAGMA foreign_keys=OFF")
                try:
                    result = write_transaction(conn, work=lambda _: work(tables))
                finally:
                    conn.execute("PRAGMA foreign_keys=ON")
            tables.commit()  # committed: the cache takes what the transaction read and wrote
            return result

        async with self._gate.lock:
            # Under the lock, before anything is written: never into a file nobody sees.
            self.verify_file()
            try:
                return await run_on_thread(db, body)
            except BaseException:
                self._forget_uncommitted()
                raise

    def _forget_uncommitted(self) -> None:
        """After a failed or cancelled transaction: ids it handed out may no longer exist, and
        whether a cancelled one committed is not known here, so nothing cached is trusted."""
        self._maps.forget_uncommitted()
        self._cache.clear()

    def _batch(self, tables: StateWriter) -> Batch:
        return Batch(self._policy, self._maps, self._clock, tables)

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise LedgerError(f"the ledger {self._path} is not open")
        return self._db

    def _sid(self, server: str) -> int:
        self._require()  # a closed ledger says so before it judges a server name
        return self._maps.sid(server)

    # ------------------------------------------------------------------ combined reads

    async def outbox_summaries(
        self, peers: Sequence[str], dead_limit: int
    ) -> dict[str, PeerOutbox]:
        """Each peer's outbox depth, oldest live row, dead count and oldest ``dead_limit`` dead
        rows, in ONE read (:mod:`jfsync.sync.ledger.combined`; the status snapshot)."""
        sids = {peer: self._sid(peer) for peer in peers}
        names = self._maps.names
        return await self._read(
            lambda tx: combined.outbox_summaries(tx.db, names, sids, dead_limit)
        )

    # ------------------------------------------------------------------ paged catch-up calls

    async def last_known_page(
        self, server: str, user: str, after: int = 0, limit: int = 1000
    ) -> tuple[dict[str, UserData], int | None]:
        """One page of :meth:`last_known_for_user`: at most ``limit`` states, of the items whose
        id is above the cursor ``after`` (0: from the start), and the cursor of the next page
        (None: this was the last). One short read each, so that a live event's apply waits
        for one page, not for a whole user (:mod:`jfsync.sync.ledger.combined`)."""
        if limit < 1:
            raise ValueError(f"a page holds at least one state, not {limit}")
        sid = self._sid(server)

        def work(tx: StateWriter) -> tuple[dict[str, UserData], int | None]:
            uid = self._maps.existing_user_id(tx.db, user)
            if uid is None:
                return {}, None
            return combined.last_known_page(tx.db, sid, uid, after, limit)

        return await self._read(work)

    async def backfill_page(
        self,
        server: str,
        user: str,
        wall_ms: int,
        after: int = 0,
        span: int = 1000,
        *,
        only_mapped: bool = False,
    ) -> tuple[int, int | None]:
        """One step of :meth:`backfill` (:meth:`backfill_mapped` with ``only_mapped``): queue
        for ``server`` what it has no history of among the next ``span`` canonical items of
        ``user`` after the cursor ``after`` (0: from the start), in one transaction. Returns
        the rows touched and the cursor of the next step (None: this was the last).

        A backfill done in steps queues what a single one would: an item whose last-known
        state on ``server`` is recorded between two steps needs no row any more (it is known
        now), and a change between two steps merges into the rows queued as any change does.
        """
        if span < 1:
            raise ValueError(f"a step covers at least one item, not {span}")
        sid = self._sid(server)

        def work(tx: StateWriter) -> tuple[int, int | None]:
            uid = self._maps.existing_user_id(tx.db, user)
            if uid is None:
                return 0, None
            pairs, last = combined.unknown_page(
                tx.db, sid, uid, after, span, only_mapped=only_mapped
            )
            if not pairs:
                return 0, last
            return self._queue_unknown(tx, sid, pairs, wall_ms), last

        return await self._write(work)


def _load_pairs(
    tx: StateWriter, keys: Sequence[Key]
) -> tuple[list[Pair], dict[Pair, CachedPair], bool]:
    """Load the pairs of ``keys``: each key's pair, in order; the pairs loaded; and whether
    every key has a pair of its own (the quick paths of a round need that)."""
    pairs = [key[:2] for key in keys]
    entries = tx.load(set(pairs))
    return pairs, entries, len(entries) == len(keys)


def _split_known(
    tx: StateWriter, keys: Sequence[Key], currents: Sequence[UserData]
) -> tuple[dict[Pair, CachedPair], list[int], list[int]]:
    """Load the pairs of a compare's ``keys``; say which reads (their indexes) equal the peer's
    last-known state, and which do not (or share a pair: all of them then)."""
    pairs, entries, distinct = _load_pairs(tx, keys)
    if not distinct:
        return entries, [], list(range(len(keys)))
    quick: list[int] = []
    slow: list[int] = []
    for index, (key, current) in enumerate(zip(keys, currents, strict=True)):
        known = entries[pairs[index]].lk.get(key)
        if known is not None and (known is current or known == current):
            quick.append(index)
        else:
            slow.append(index)
    return entries, quick, slow


def _split_acks(
    tx: StateWriter,
    keys: Sequence[Key],
    acks: Sequence[tuple[OutboxRow, UserData]],
    states: Sequence[UserData],
) -> tuple[dict[Pair, CachedPair], list[int], list[int]]:
    """Load the pairs of acks' ``keys``; say which acks (their indexes) are the usual ones (the
    row still the version written, or gone; the canonical value the state written) and which
    are not (or share a pair: all of them then)."""
    pairs, entries, distinct = _load_pairs(tx, keys)
    if not distinct:
        return entries, [], list(range(len(keys)))
    quick: list[int] = []
    slow: list[int] = []
    for index, key in enumerate(keys):
        entry = entries[pairs[index]]
        row = entry.rows.get(key)
        canonical = entry.canon
        state = states[index]
        if (row is not None and row.version != acks[index][0].version) or (
            canonical is not None and canonical.data is not state and canonical.data != state
        ):
            slow.append(index)
        else:
            quick.append(index)
    return entries, quick, slow
