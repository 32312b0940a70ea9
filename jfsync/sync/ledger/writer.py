"""The one writer of the cached tables, per transaction, and the reads that go with it.

The canonical states, last-known states, pending echoes and outbox rows are the tables whose
decoded rows the ledger keeps between transactions (:class:`jfsync.sync.ledger.cache.StateCache`).
Every write to them in the package goes through a :class:`StateWriter`, made by the ledger for
each transaction, so the cache is kept right by construction: loads come from the cache (until
the transaction has written, and never for pairs its bulk statements touched) or from SQLite
(pairs of a user or item the transaction itself created hold nothing and are not read);
writes are remembered as final values; only once the transaction has committed does the cache
take what was read and written, then drop what bulk statements touched. A transaction that does
not commit leaves the cache as it was (the ledger then empties it, as it does after a cancelled
caller). Reads outside a write transaction get a read-only writer that refuses writes.
Everything here, :meth:`StateWriter.commit` included (right after COMMIT), runs on the
connection's own thread, inside the transaction's one call under the ledger's gate lock
(:mod:`jfsync.sync.ledger.store`): the cache is never read or changed anywhere else.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any

from jfsync.model import Register, UserData
from jfsync.sync.echo import PendingWrite
from jfsync.sync.ledger.cache import CachedPair, StateCache
from jfsync.sync.ledger.codec import (
    CANON_COLS,
    CHUNK,
    MASK_BITS,
    RUN_MIN,
    STATE_COLS,
    Key,
    Pair,
    SharedRows,
    chunks,
    decode_canonical,
    decode_echo,
    decode_state,
    encode_echo,
    fetch,
    insert_flat,
    marks,
    mask_bits,
    state_values,
    upsert_sql,
)
from jfsync.sync.ledger.errors import LedgerError
from jfsync.sync.ledger.outbox import ROW_COLS, WORK_SELECT, WorkRow, decode_work_row
from jfsync.sync.merge import CanonicalState

_UPSERT_CANONICAL = upsert_sql("canonical", CANON_COLS, "user, item")
_UPSERT_LAST_KNOWN = upsert_sql(
    "last_known", f"user, item, server, {STATE_COLS}", "user, item, server"
)
_UPSERT_ECHO = upsert_sql("pending_echo", "user, item, server, entries", "user, item, server")
#: Values per row of those upserts and of an outbox row's INSERT.
_CANON_WIDTH = len(CANON_COLS.split(", "))
_STATE_WIDTH = 3 + len(STATE_COLS.split(", "))
_ROW_WIDTH = 4 + len(ROW_COLS.split(", "))
_SELECT_CANONICAL = f"SELECT {CANON_COLS} FROM canonical"  # noqa: S608 - fixed columns
_SELECT_LAST_KNOWN = f"SELECT user, item, server, {STATE_COLS} FROM last_known"  # noqa: S608
_SELECT_ECHO = "SELECT user, item, server, entries FROM pending_echo"
_INSERT_ROW = (
    f"INSERT INTO outbox(id, peer, user, item, {ROW_COLS}) "  # noqa: S608 - fixed columns
    f"VALUES ({marks(4 + len(ROW_COLS.split(', ')))})"
)
#: A new row that owes its first attempt (no failure yet: the columns after ``created_ms`` at
#: their defaults), as nearly every new row does: four columns fewer to bind and encode.
_NEW_ROW_WIDTH = 7 + len(STATE_COLS.split(", "))
_INSERT_NEW_ROW = (
    f"INSERT INTO outbox(id, peer, user, item, registers, {STATE_COLS}, "  # noqa: S608
    f"version, created_ms) VALUES ({marks(_NEW_ROW_WIDTH)})"
)
#: A pair's outbox rows: one look-up per server in the unique (peer, user, item) index (there is
#: no index by user and item alone: every row written paid for it).
_ROWS_BY_PEER = "o.peer IN (SELECT id FROM servers) AND "
_UPDATE_ROW = f"UPDATE outbox SET {', '.join(c + '=?' for c in ROW_COLS.split(', '))} WHERE id=?"  # noqa: S608


#: The layouts of :class:`SharedRows` runs (see there): a last-known state's row, its key
#: its own, its state shared; a canonical state's row whose three registers hold one decision
#: (its stamp's time its own), and one whose favorite and rating hold one decision and whose
#: play state holds another (each time its own); a new outbox row's, its id, key and version
#: its own, its registers, desired state and creation time shared.
_STATE_RUN = (0, 1, 2, -1, -2, -3, -4, -5, -6)
_CANON_ONE_RUN = (0, 1, -1, -2, -3, -4, -5, -6, 2, -7, -8, 2, -7, -8, 2, -7, -8)
_CANON_TWO_RUN = (0, 1, -1, -2, -3, -4, -5, -6, 2, -7, -8, 2, -7, -8, 3, -9, -10)
_NEW_ROW_RUN = (0, 1, 2, 3, -1, -2, -3, -4, -5, -6, -7, 4, -8)


def _gather_states(rows: SharedRows, states: Mapping[Key, UserData]) -> None:
    """The upsert rows of last-known states: a burst repeats one state object for many keys,
    so each run of the same object is encoded once, and bound once per statement
    (:class:`SharedRows`) when long enough."""
    extend = rows.flat.extend
    last: UserData | None = None
    values: tuple[Any, ...] = ()
    own: list[Any] = []

    def flush() -> None:
        # A long run binds its state once per statement; a short one, per row.
        if len(own) >= 3 * RUN_MIN:
            rows.add_run(_STATE_RUN, values, own)
        else:
            for start in range(0, len(own), 3):
                extend(own[start : start + 3])
                extend(values)

    for key, state in states.items():
        if state is not last:
            flush()
            own = []
            values, last = state_values(state), state
        own += key
    flush()


def _gather_canonical(rows: SharedRows, states: Mapping[Pair, CanonicalState]) -> None:
    """The upsert rows of canonical states (:data:`CANON_COLS`), each run of one shared data
    object encoded once. A bulk apply's rows come in runs of one shape: one state, the three
    registers decided at once (a first state) or the favorite and rating at once and the play
    state apart (a new play state), each decision by the same server (its tiebreak and
    origin): such runs bind those values once per statement (:class:`SharedRows`)."""
    extend = rows.flat.extend
    last: UserData | None = None
    values: tuple[Any, ...] = ()
    # The current run: its shape (0: none), what its rows share and their own values.
    shape = 0
    shared: tuple[Any, ...] = ()
    own: list[Any] = []
    # (Named tuples all the way down: a state, its stamped registers and their stamps are
    # unpacked, which is cheaper than reading them by name.)
    for pair, (data, f, r, p) in states.items():
        (f_ms, f_tiebreak), f_origin = f
        if data is last and f is r:
            if r is p:
                if shape == 1 and f_tiebreak == shared[6] and f_origin == shared[7]:
                    own += (*pair, f_ms)
                    continue
            elif shape == 2 and f_tiebreak == shared[6] and f_origin == shared[7]:
                (p_ms, p_tiebreak), p_origin = p
                if p_tiebreak == shared[8] and p_origin == shared[9]:
                    own += (*pair, f_ms, p_ms)
                    continue
        # Not the current run's: it ends here, and this row may start the next.
        if shape:
            _close_canonical(rows, shape, shared, own)
            shape = 0
        if data is not last:
            values, last = state_values(data), data
        if f is r:
            if r is p:
                shape, shared, own = 1, (*values, f_tiebreak, f_origin), [*pair, f_ms]
            else:
                (p_ms, p_tiebreak), p_origin = p
                shared = (*values, f_tiebreak, f_origin, p_tiebreak, p_origin)
                shape, own = 2, [*pair, f_ms, p_ms]
            continue
        (r_ms, r_tiebreak), r_origin = r
        (p_ms, p_tiebreak), p_origin = p
        extend(pair)
        extend(values)
        extend((f_ms, f_tiebreak, f_origin, r_ms, r_tiebreak, r_origin, p_ms, p_tiebreak, p_origin))
    if shape:
        _close_canonical(rows, shape, shared, own)


def _close_canonical(rows: SharedRows, shape: int, shared: tuple[Any, ...], own: list[Any]) -> None:
    """End a run of :func:`_gather_canonical`: a run if long enough, else whole rows."""
    width = 3 if shape == 1 else 4
    if len(own) >= width * RUN_MIN:
        rows.add_run(_CANON_ONE_RUN if shape == 1 else _CANON_TWO_RUN, shared, own)
        return
    extend = rows.flat.extend
    values, f_stamp = shared[:6], shared[6:8]
    for start in range(0, len(own), width):
        extend(own[start : start + 2])
        extend(values)
        f_decision = (own[start + 2], *f_stamp)
        if shape == 1:
            extend(f_decision * 3)
        else:
            extend(f_decision * 2)
            extend((own[start + 3], *shared[8:]))


def _close_new_rows(rows: SharedRows, shared: tuple[Any, ...], own: list[Any]) -> None:
    """End a run of new outbox rows of :meth:`StateWriter.put_rows`: a :class:`SharedRows`
    run if long enough, else whole rows."""
    if len(own) >= 5 * RUN_MIN:
        rows.add_run(_NEW_ROW_RUN, shared, own)
        return
    extend = rows.flat.extend
    head, created_ms = shared[:-1], shared[-1]
    for start in range(0, len(own), 5):
        extend(own[start : start + 4])
        extend(head)
        extend((own[start + 4], created_ms))


def _delete_ids(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Delete the outbox rows of ``ids``, a statement per :data:`CHUNK` of them (the acks of a
    round delete hundreds: one statement step each cost more than the deletes)."""
    for chunk in chunks(sorted(ids), CHUNK):
        db.execute(
            f"DELETE FROM outbox WHERE id IN ({marks(len(chunk))})",  # noqa: S608 - placeholders
            chunk,
        )


class StateWriter:
    """Reads and writes of the cached tables within one transaction (or one read).

    ``cache`` None: nothing is taken from or given to the cache (the invariant check reads
    the file itself). ``writable`` False: every write raises LedgerError.
    """

    def __init__(
        self, db: sqlite3.Connection, cache: StateCache | None, *, writable: bool = True
    ) -> None:
        self.db = db
        self._cache = cache
        self._writable = writable
        #: Pairs read from SQLite in this transaction, complete, as read, and the pairs that
        #: held nothing (of a user or item it created).
        self._read: dict[Pair, CachedPair] = {}
        self._fresh: dict[Pair, None] = {}  # (an ordered set: in the order loaded)
        #: The final value this transaction wrote, per pair or key.
        #: What this transaction wrote, in the order it wrote it (the caller's mappings, kept
        #: as given: they are not changed afterwards), and the final row of each key.
        self._canon: list[Mapping[Pair, CanonicalState]] = []
        self._lk: list[Mapping[Key, UserData]] = []
        self._echo: list[Mapping[Key, tuple[PendingWrite, ...]]] = []
        self._rows: dict[Key, WorkRow | None] = {}
        #: Whether this transaction wrote: the cache is then old for what it wrote, so later
        #: loads read SQLite (which has the transaction's writes).
        self._wrote = False
        #: Pairs touched by bulk statements (dropped at commit), or all of them.
        self._evicted: set[Pair] = set()
        self._cleared = False
        #: The pairs loaded in this transaction, as loaded (with ``_rows``: the outbox row
        #: each key has in the file now).
        self._loaded: dict[Pair, CachedPair] = {}
        #: Row ids handed out by :meth:`number_rows` and not inserted yet.
        self._new_ids: set[int] = set()
        self._highest_id = 0

    @property
    def cached(self) -> bool:
        """Whether this writer reads from and gives to the state cache."""
        return self._cache is not None

    def commit(self) -> None:
        """The transaction committed: the cache takes what it read and wrote, then drops what
        bulk statements touched."""
        cache = self._cache
        if cache is None:
            return
        if self._cleared:
            cache.clear()
            return
        read = self._read
        if self._fresh:
            # Pairs that held nothing when the transaction began: whole as read, and empty.
            fresh = {pair: CachedPair(None) for pair in self._fresh}
            fresh.update(read)
            read = fresh
        cache.committed(read, self._canon, self._lk, self._echo, self._rows)
        if self._evicted:
            cache.evict(self._evicted)

    # ------------------------------------------------------------------ pairs

    def load(self, pairs: Set[Pair], empty: Set[Pair] = frozenset()) -> dict[Pair, CachedPair]:
        """Everything the file holds for ``pairs`` (complete), from the cache or SQLite.

        The cache's entries come in the order of ``pairs``, and those of ``empty`` join the
        cache in that order (give an ordered set: a bulk apply then walks them in memory order).

        ``empty``: pairs of a user or item this transaction created, so that nothing in the
        file refers to them; they are not read (unless this transaction already wrote) and
        are left out of the result (they hold nothing), to join the cache at commit.
        The entries are shared with the cache: read them, never change them.
        """
        found: dict[Pair, CachedPair] = {}
        if empty and not self._wrote and not self._cleared:
            fresh = [pair for pair in pairs if pair in empty]
            if fresh:
                self._fresh.update(dict.fromkeys(fresh))
                pairs = pairs - empty
        cache = None if self._cleared or self._wrote else self._cache
        missing = set(pairs) if cache is None else cache.take(pairs, self._evicted, found)
        if missing:
            read = self._read_pairs(missing)
            self._read.update(read)
            found.update(read)
        if self._loaded:
            self._loaded.update(found)
        else:
            self._loaded = dict(found)  # a copy in C: the caller keeps ``found``
        return found

    def _read_pairs(self, pairs: set[Pair]) -> dict[Pair, CachedPair]:
        entries: dict[Pair, CachedPair] = {}
        canon = {
            (int(row[0]), int(row[1])): decode_canonical(row)
            for row in self._by_pairs(_SELECT_CANONICAL, pairs)
        }
        for pair in pairs:
            entries[pair] = CachedPair(canon.get(pair))
        for row in self._by_pairs(_SELECT_LAST_KNOWN, pairs):
            uid, iid = int(row[0]), int(row[1])
            entries[(uid, iid)].put_lk((uid, iid, int(row[2])), decode_state(row, 3))
        for row in self._by_pairs(_SELECT_ECHO, pairs):
            uid, iid = int(row[0]), int(row[1])
            entries[(uid, iid)].put_echo((uid, iid, int(row[2])), decode_echo(str(row[3])))
        # Through the unique (peer, user, item) index, once per server (schema v5).
        for row in self._by_pairs(WORK_SELECT, pairs, alias="o.", first=_ROWS_BY_PEER):
            (uid, iid, sid), work = decode_work_row(row)
            entries[(uid, iid)].put_row((uid, iid, sid), work)
        return entries

    def _by_pairs(
        self, select: str, pairs: set[Pair], alias: str = "", first: str = ""
    ) -> list[Any]:
        """The rows of ``select`` of ``pairs`` (``alias``: its table's; ``first``: a condition
        put before the pair's, ending in AND)."""
        by_user: dict[int, list[int]] = defaultdict(list)
        for uid, iid in pairs:
            by_user[uid].append(iid)
        found: list[Any] = []
        where = f"{select} WHERE {first}{alias}user=? AND {alias}item IN "
        for uid, items in by_user.items():
            for chunk in chunks(sorted(items), CHUNK):
                found.extend(fetch(self.db, f"{where}({marks(len(chunk))})", (uid, *chunk)))
        return found

    def put_canonical(self, states: Mapping[Pair, CanonicalState]) -> None:
        """Write canonical states (``states`` is kept for the cache: leave it unchanged)."""
        self._require_writable()
        rows = SharedRows(_UPSERT_CANONICAL, _CANON_WIDTH)
        _gather_canonical(rows, states)
        rows.write(self.db)
        self._canon.append(states)
        self._wrote = True

    def put_last_known(self, states: Mapping[Key, UserData]) -> None:
        """Write last-known states (``states`` is kept for the cache: leave it unchanged)."""
        self._require_writable()
        rows = SharedRows(_UPSERT_LAST_KNOWN, _STATE_WIDTH)
        _gather_states(rows, states)
        rows.write(self.db)
        self._lk.append(states)
        self._wrote = True

    def put_echoes(self, echoes: Mapping[Key, tuple[PendingWrite, ...]]) -> None:
        """Write pending echo lists (an empty one deletes the key's; ``echoes`` is kept for the
        cache: leave it unchanged)."""
        self._require_writable()
        keep: list[Any] = []  # one row after the other (insert_flat)
        drop: list[Key] = []
        extend = keep.extend
        # Lists are shared between keys (a round's intents and acks: Batch.with_write), so
        # each is encoded once (by identity: every one of them lives in ``echoes``).
        texts: dict[int, str] = {}
        for key, pending in echoes.items():
            if not pending:
                drop.append(key)
                continue
            text = texts.get(id(pending))
            if text is None:
                text = texts[id(pending)] = encode_echo(pending)
            extend(key)
            keep.append(text)
        if keep:
            insert_flat(self.db, _UPSERT_ECHO, keep, 4)
        if drop:
            self.db.executemany(
                "DELETE FROM pending_echo WHERE user=? AND item=? AND server=?", drop
            )
        self._echo.append(echoes)
        self._wrote = True

    def number_rows(self, count: int) -> int:
        """Hand out ``count`` new outbox row ids; return the first.

        Numbered inside the write transaction (no other writer can take a number), so callers
        and the cache know every row's id without reading it back after the insert.
        """
        self._require_writable()
        first = self.next_row_id()
        self._highest_id = first + count - 1
        self._new_ids.update(range(first, first + count))
        return first

    def next_row_id(self) -> int:
        """The first id :meth:`number_rows` would hand out now (nothing is handed out)."""
        rows = fetch(self.db, "SELECT COALESCE(MAX(id), 0) FROM outbox")
        return max(int(next(iter(rows))[0]), self._highest_id) + 1

    def put_rows(self, rows: Mapping[Key, WorkRow | None]) -> None:
        """Write outbox rows of keys loaded in this transaction (None: the key has none).

        A row numbered by :meth:`number_rows` is inserted, any other updated in place; a
        stored row replaced by a newly numbered one, or by None, is deleted.
        """
        self._require_writable()
        deletes: list[int] = []
        updates: list[tuple[Any, ...]] = []
        inserts: list[Any] = []  # one row after the other (insert_flat), then
        fresh = SharedRows(_INSERT_NEW_ROW, _NEW_ROW_WIDTH)  # those owing their first attempt
        extend_inserts = inserts.extend
        # The current run of new rows owing one desired state object (the same registers,
        # made at the same time): their ids, keys and versions (_NEW_ROW_RUN).
        run: list[Any] = []
        run_shared: tuple[Any, ...] = ()
        run_desired: UserData | None = None
        run_bits = -1
        run_created = 0
        new_ids = self._new_ids
        written, loaded = self._rows, self._loaded
        # What _stored_id does, inline, and each run of one desired state encoded once: a bulk
        # apply writes thousands of rows, most of them owing one state object.
        last: UserData | None = None
        values: tuple[Any, ...] = ()
        loaded_entry = loaded.get
        known_bits = MASK_BITS.get
        last_mask: frozenset[Register] | None = None
        bits = 0
        for key, row in rows.items():
            if key in written:
                prior = written[key]
            else:
                entry = loaded_entry((key[0], key[1]))
                prior = entry.rows.get(key) if entry is not None and entry.rows else None
            if row is None:
                if prior is not None and prior.id is not None:
                    deletes.append(prior.id)
                continue
            row_id, mask, desired, version, created_ms, attempts, next_ms, error, dead = row
            assert row_id is not None  # number_rows first
            if desired is not last:
                values, last = state_values(desired), desired
            if mask is not last_mask:  # (masks are shared: MASKS)
                known = known_bits(mask)
                bits = mask_bits(mask) if known is None else known
                last_mask = mask
            if row_id in new_ids:
                if prior is not None and prior.id is not None:
                    deletes.append(prior.id)
                new_ids.discard(row_id)
                if not attempts and not next_ms and error is None and not dead:
                    if desired is run_desired and bits == run_bits and created_ms == run_created:
                        run += (row_id, key[2], key[0], key[1], version)
                        continue
                    if run:
                        _close_new_rows(fresh, run_shared, run)
                    run_desired, run_bits, run_created = desired, bits, created_ms
                    run_shared = (bits, *values, created_ms)
                    run = [row_id, key[2], key[0], key[1], version]
                    continue
                extend_inserts((row_id, key[2], key[0], key[1], bits))
                extend_inserts(values)
                extend_inserts((version, created_ms, attempts, next_ms, error, 1 if dead else 0))
            else:
                updates.append(
                    (
                        bits,
                        *values,
                        version,
                        created_ms,
                        attempts,
                        next_ms,
                        error,
                        1 if dead else 0,
                        row_id,
                    )
                )
        if deletes:
            _delete_ids(self.db, deletes)
        if updates:
            self.db.executemany(_UPDATE_ROW, updates)
        if run:
            _close_new_rows(fresh, run_shared, run)
        fresh.write(self.db)
        if inserts:
            insert_flat(self.db, _INSERT_ROW, inserts, _ROW_WIDTH)
        self._rows.update(rows)
        self._wrote = True

    def _stored_id(self, key: Key) -> int | None:
        """The id of the outbox row ``key`` has in the file now (None: none, or not loaded)."""
        rows = self._rows
        if key in rows:
            row = rows[key]
        else:
            entry = self._loaded.get((key[0], key[1]))
            row = None if entry is None else entry.rows.get(key)
        return None if row is None else row.id

    # ------------------------------------------------------------------ bulk statements

    def forget_items_on(self, sid: int, items: Sequence[str]) -> None:
        """Drop server ``sid``'s last-known states and pending echoes of canonical ``items``."""
        self._require_writable()
        self._clear()
        for chunk in chunks(sorted(set(items)), CHUNK):
            for table in ("last_known", "pending_echo"):
                self.db.execute(
                    f"DELETE FROM {table} WHERE server=? AND item IN "  # noqa: S608
                    f"(SELECT id FROM items WHERE key IN ({marks(len(chunk))}))",
                    (sid, *chunk),
                )

    def retire(self, item_ids: Sequence[int]) -> None:
        """Drop every canonical state, last-known state, echo and row of the items."""
        self._require_writable()
        self._clear()
        gone = set(item_ids)
        self._loaded = {p: e for p, e in self._loaded.items() if p[1] not in gone}
        self._rows.update({k: None for k in self._rows if k[1] in gone})
        for chunk in chunks(item_ids, CHUNK):
            for table in ("canonical", "last_known", "pending_echo", "outbox"):
                self.db.execute(
                    f"DELETE FROM {table} WHERE item IN ({marks(len(chunk))})",  # noqa: S608
                    chunk,
                )

    def forget_echoes(self, sid: int, user: str) -> int:
        """Drop every pending echo of canonical ``user`` on server ``sid``; return the keys."""
        self._require_writable()
        self._clear()
        cursor = self.db.execute(
            "DELETE FROM pending_echo WHERE server=? AND user IN "
            "(SELECT id FROM users WHERE key=?)",
            (sid, user),
        )
        count = cursor.rowcount
        cursor.close()
        return count

    def forget_server(self, sid: int) -> int:
        """Drop server ``sid``'s last-known states and echoes; return how many states went."""
        self._require_writable()
        self._clear()
        cursor = self.db.execute("DELETE FROM last_known WHERE server=?", (sid,))
        dropped = cursor.rowcount
        cursor.close()
        self.db.execute("DELETE FROM pending_echo WHERE server=?", (sid,))
        return dropped

    def fail_rows(
        self, failed: Sequence[tuple[int, Pair | None]], reason: str, retry_at_ms: int
    ) -> None:
        """Count a failed attempt of each row id (with its pair, None: not known here)."""
        self._require_writable()
        self._evict(pair for _, pair in failed)
        self.db.executemany(
            "UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt_ms=? WHERE id=?",
            [(reason, retry_at_ms, row_id) for row_id, _ in failed],
        )

    def park_row(self, row_id: int, version: int, reason: str, pair: Pair | None) -> bool:
        """Park a live row still at ``version`` as dead; tell whether it was."""
        self._require_writable()
        self._evict([pair])
        cursor = self.db.execute(
            "UPDATE outbox SET dead=1, attempts=attempts+1, last_error=? "
            "WHERE id=? AND version=? AND dead=0",
            (reason, row_id, version),
        )
        parked = cursor.rowcount == 1
        cursor.close()
        return parked

    def revive_dead(self, sid: int) -> int:
        """Make every dead row of peer ``sid`` live and due now; return how many."""
        self._require_writable()
        self._clear()
        cursor = self.db.execute(
            "UPDATE outbox SET dead=0, attempts=0, next_attempt_ms=0 WHERE peer=? AND dead=1",
            (sid,),
        )
        count = cursor.rowcount
        cursor.close()
        return count

    def reset_backoff(self, sid: int) -> int:
        """Make every live row of peer ``sid`` due now; return how many."""
        self._require_writable()
        self._clear()
        cursor = self.db.execute(
            "UPDATE outbox SET next_attempt_ms=0 WHERE peer=? AND dead=0 AND next_attempt_ms>0",
            (sid,),
        )
        count = cursor.rowcount
        cursor.close()
        return count

    def narrow_rows(self, rows: Sequence[tuple[int, Key, int]]) -> None:
        """Keep of each outbox row (id, its key) only the register bits given (0: delete it).

        Rows of any key, loaded in this transaction or not: their pairs are dropped from the
        cache at commit, and a later load of them in this transaction reads SQLite.
        """
        self._require_writable()
        if not rows:
            return
        self._evict(key[:2] for _, key, _ in rows)
        gone = [rid for rid, _, bits in rows if bits == 0]
        narrowed = [(bits, rid) for rid, _, bits in rows if bits != 0]
        for rid, key, bits in rows:
            if bits == 0 and self._stored_id(key) == rid:
                self._rows[key] = None  # the key has no row in the file now
        if gone:
            _delete_ids(self.db, gone)
        if narrowed:
            self.db.executemany("UPDATE outbox SET registers=? WHERE id=?", narrowed)

    def _clear(self) -> None:
        """Rows of unknown pairs change: the cache is emptied at commit, bypassed until."""
        self._cleared = True

    def _evict(self, pairs: Iterable[Pair | None]) -> None:
        for pair in pairs:
            if pair is None:
                self._clear()
                return
            self._evicted.add(pair)

    def _require_writable(self) -> None:
        if not self._writable:
            raise LedgerError("the ledger's state tables are written only inside a transaction")

    # ------------------------------------------------------------------ other reads

    def last_known(self, key: Key) -> UserData | None:
        """One last-known state, read without loading a whole pair."""
        rows = fetch(
            self.db,
            f"SELECT {STATE_COLS} FROM last_known "  # noqa: S608 - fixed columns
            "WHERE user=? AND item=? AND server=?",
            key,
        )
        return next((decode_state(r, 0) for r in rows), None)

    def last_known_for(self, sid: int, user: str) -> dict[str, UserData]:
        """Every last-known state of canonical ``user`` on server ``sid``, by canonical item."""
        rows = fetch(
            self.db,
            f"SELECT i.key, {STATE_COLS} FROM last_known k "  # noqa: S608 - fixed columns
            "JOIN users u ON u.id = k.user JOIN items i ON i.id = k.item "
            "WHERE k.server=? AND u.key=?",
            (sid, user),
        )
        return {str(r[0]): decode_state(r, 1) for r in rows}

    def pending_echoes(self, key: Key) -> tuple[PendingWrite, ...]:
        """The pending echoes of one key."""
        rows = fetch(
            self.db, "SELECT entries FROM pending_echo WHERE user=? AND item=? AND server=?", key
        )
        return next((decode_echo(str(r[0])) for r in rows), ())

    def known_on(self, sid: int) -> set[Pair]:
        """Pairs with both a canonical state and a last-known state on server ``sid``."""
        rows = fetch(
            self.db,
            "SELECT k.user, k.item FROM last_known k JOIN canonical c "
            "ON c.user=k.user AND c.item=k.item WHERE k.server=?",
            (sid,),
        )
        return {(int(r[0]), int(r[1])) for r in rows}

    def servers_with_history(self) -> set[str]:
        """The names of the servers that have at least one last-known state."""
        rows = fetch(
            self.db,
            "SELECT s.name FROM servers s WHERE EXISTS "
            "(SELECT 1 FROM last_known k WHERE k.server=s.id)",
        )
        return {str(r[0]) for r in rows}

    def unknown_to(self, sid: int, uid: int, *, only_mapped: bool) -> set[Pair]:
        """Pairs of user ``uid`` with a canonical state but no last-known state on ``sid``
        (with ``only_mapped``, only items ``sid`` maps)."""
        mapped = (
            "AND EXISTS (SELECT 1 FROM server_items s WHERE s.server=? AND s.item=c.item) "
            if only_mapped
            else ""
        )
        rows = fetch(
            self.db,
            f"SELECT c.item FROM canonical c WHERE c.user=? {mapped}"  # noqa: S608 - fixed text
            "AND NOT EXISTS (SELECT 1 FROM last_known k WHERE k.user=c.user "
            "AND k.item=c.item AND k.server=?)",
            (uid, sid, sid) if only_mapped else (uid, sid),
        )
        return {(uid, int(r[0])) for r in rows}
