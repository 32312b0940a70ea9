"""The ledger: jfsync's SQLite store of canonical data, last-known states, echoes and outbox.

One :class:`Ledger` owns one aiosqlite connection (WAL, foreign keys, schema from
:mod:`jfsync.sync.ledger.schema`). Everything that matters commits together: applying an
observation runs the echo rule (:mod:`jfsync.sync.echo`), diffs against the origin's last-known
state, stamps the change with the persisted hybrid clock, merges (:mod:`jfsync.sync.merge`),
updates the canonical and last-known states and upserts the outbox rows of every server that has
the user, in ONE transaction. A crash at any point therefore loses nothing that was committed
and leaves nothing half-written; a redelivered write is harmless because the pusher skips
targets that already hold the desired state.

Sources: an observation is a websocket ``event`` (runs the echo rule and consumes pending
states), a ``scan`` page (matches pending states without consuming them: a page can be older
than a write made while scanning) or a ``compare`` read by the pusher (fresh: always diffed).
An event equal to the state a write replaced was flushed before that write and is ignored as
stale (see :mod:`jfsync.sync.echo`). When a user's socket (re)connects, call
:meth:`Ledger.forget_echoes` before the resync scan.

Keys: servers are config names; users and items are *canonical keys* (strings). Identity
resolution (server user/item id → canonical key) happens before the ledger; the id maps
(:meth:`Ledger.map_user`, :meth:`Ledger.map_item`) store it, with type, path and provider ids
so later matching strategies need no schema change. Until then callers use the server's ids as
canonical keys. A server "has" a user when :meth:`Ledger.map_user` recorded it; only those
servers get outbox rows (the origin of an observation always may).

Outbox: at most one row per (peer, user, item). It names the registers owed and the desired
state (the canonical state when the row last changed); a newer change merges into it and
bumps its ``version`` (a hybrid-clock value, unique over the ledger's life). Registers whose
desired value already equals the peer's last-known state are pruned, so a row disappears when
nothing is owed any more. A pusher uses it like this:

1. ``rows = await ledger.due_rows(peer, limit, now_ms, exclude=in_flight_keys)``
   (``exclude`` takes (user, item) keys);
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
   (:meth:`OutboxRow.intended`), not the server's reply: a user change made between the read
   and the write then shows up in the echo as a real change instead of being taken for the
   echo. ``row_written`` records that state as pending echo and as last-known, and deletes the
   row only if its version is unchanged (a newer change that replaced it mid-flight stays
   queued);
5. on failure ``row_failed(row, reason, retry_at_ms)`` (transient) or ``row_dead(row,
   reason)`` (400/404: parked, listed by :meth:`Ledger.dead_rows`, revived by a newer change
   or :meth:`Ledger.retry_dead`). After a down peer returns, :meth:`Ledger.reset_backoff`.

Steps 2 and 4 have batch forms (:meth:`Ledger.observe_before_writes`,
:meth:`Ledger.rows_written`), and step 3 takes many rows, each in one transaction; use them
under load. ``observe_before_writes(..., intents=...)`` does steps 2 and 3 in one transaction.

Decoded state of recently used (user, item) pairs is kept between transactions in a bounded
write-through cache (:class:`_StateCache`); writes that bypass it, and rollbacks, empty it.
Rows are identified by (peer, user, item) and ``version``; the integer ``id`` is only a handle.

Reset guard (:mod:`jfsync.sync.resetguard`): :meth:`Ledger.rebase_last_known` takes what a server
that lost a user's data now holds as its last-known state without merging it, and queues the
canonical state for it; ``reset_holds`` rows (:meth:`Ledger.hold_reset`,
:meth:`Ledger.resolve_reset_holds`) pause a (server, user): :meth:`Ledger.due_rows` skips its
rows until the hold is dropped. Each server's Jellyfin id is kept (:meth:`Ledger.jellyfin_id`);
:meth:`Ledger.forget_server_history` makes a replaced server a first contact again.

All methods serialise on one lock; no transaction is held across anything but the ledger's own
SQL. Tokens are stored in clear in the ledger file (protect the file) and never logged.

The file: :meth:`Ledger.open` refuses an existing file that is not an SQLite database (0 bytes
included; :func:`check_ledger_file`) and records the file's device and inode; every write
transaction first checks that the path still names that file (:meth:`Ledger.verify_file`) and
refuses to write into a file that was deleted or replaced (:class:`LedgerFileLostError`;
``file_lost_observers`` are told once). Opened with the config's ``users.map``, it moves
people keyed by their entry's position (``map:0``) to the entry's stable key.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self

import aiosqlite

from jfsync.errors import JfsyncError
from jfsync.model import (
    ALL_REGISTERS,
    DEFAULT_USER_DATA,
    Register,
    Stamp,
    UserData,
    user_data,
)
from jfsync.sync.echo import (
    PendingWrite,
    Verdict,
    after_read,
    classify_event,
    match_echo,
    record_write,
)
from jfsync.sync.ledger.schema import WriteGate, connect, migrate, prepare
from jfsync.sync.merge import CanonicalState, MergePolicy, Stamped, merge, next_stamp_ms
from jfsync.sync.users import is_positional_map_key, plan_map_key_migration

logger = logging.getLogger(__name__)

Source = Literal["event", "scan", "compare", "read"]

#: Placeholders per IN (...) list; far below SQLite's variable limit, large enough to batch.
_CHUNK = 500

_BITS: dict[Register, int] = {Register.FAVORITE: 1, Register.RATING: 2, Register.PLAY_STATE: 4}

_STATE_COLS = "favorite, rating, played, play_count, last_played_s, position_ticks"
_CANON_COLS = (
    f"user, item, {_STATE_COLS}, favorite_ms, favorite_tiebreak, favorite_origin, "
    "rating_ms, rating_tiebreak, rating_origin, "
    "play_state_ms, play_state_tiebreak, play_state_origin"
)
#: An outbox row with its canonical keys and the peer's own ids, in one indexed read.
_ROW_SELECT = (
    "SELECT o.id, o.peer, u.key, i.key, o.registers, o.favorite, o.rating, o.played, "
    "o.play_count, o.last_played_s, o.position_ticks, o.version, o.created_ms, o.attempts, "
    "o.next_attempt_ms, o.last_error, o.dead, su.remote_id, si.remote_id, o.user, o.item "
    "FROM outbox o JOIN users u ON u.id = o.user JOIN items i ON i.id = o.item "
    "LEFT JOIN server_users su ON su.server = o.peer AND su.user = o.user "
    "LEFT JOIN server_items si ON si.server = o.peer AND si.item = o.item "
)


def _upsert(table: str, columns: str, key: str) -> str:
    """An INSERT of ``columns`` that updates the row in place when ``key`` exists.

    Unlike INSERT OR REPLACE (delete, then insert), this leaves secondary indexes alone when
    their columns do not change: about a third less SQLite work per row on the hot paths.
    """
    keys = set(key.split(", "))
    values = [c for c in columns.split(", ") if c not in keys]
    assignments = ", ".join(f"{c}=excluded.{c}" for c in values)
    marks = ", ".join("?" * len(columns.split(", ")))
    return (
        f"INSERT INTO {table}({columns}) VALUES ({marks}) "  # noqa: S608 - fixed names
        f"ON CONFLICT({key}) DO UPDATE SET {assignments}"
    )


_UPSERT_CANONICAL = _upsert("canonical", _CANON_COLS, "user, item")
_UPSERT_LAST_KNOWN = _upsert(
    "last_known", f"user, item, server, {_STATE_COLS}", "user, item, server"
)
_UPSERT_ECHO = _upsert("pending_echo", "user, item, server, entries", "user, item, server")
#: Rows of a (peer, user) the reset guard holds wait: nothing is written there until resolved.
_NOT_HELD = (
    "AND NOT EXISTS (SELECT 1 FROM reset_holds h WHERE h.server = o.peer AND h.user = o.user) "
)
_SELECT_CANONICAL = f"SELECT {_CANON_COLS} FROM canonical"  # noqa: S608 - fixed columns
_SELECT_LAST_KNOWN = f"SELECT user, item, server, {_STATE_COLS} FROM last_known"  # noqa: S608
_SELECT_ECHO = "SELECT user, item, server, entries FROM pending_echo"
_SELECT_OUTBOX = (
    "SELECT o.user, o.item, o.peer, o.id, o.registers, o.favorite, o.rating, o.played, "
    "o.play_count, o.last_played_s, o.position_ticks, o.version, o.created_ms, o.attempts, "
    "o.next_attempt_ms, o.last_error, o.dead FROM outbox o"
)


class LedgerError(JfsyncError):
    """The ledger was used wrongly (closed, unknown server) or its file is unusable."""


class LedgerInUseError(LedgerError):
    """Another jfsync process has the ledger file open."""


class LedgerFileError(LedgerError):
    """The file at the ledger path is not a ledger (empty, not SQLite): refused, never reused."""


class LedgerFileLostError(LedgerError):
    """The file jfsync has open is no longer the file at the ledger path (deleted, replaced)."""


#: The first 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
#: The length of the SQLite database header.
SQLITE_HEADER_BYTES = 100


def sqlite_header_problem(header: bytes) -> str | None:
    """What is wrong with the first bytes of a file that should be a ledger (None: nothing),
    worded to follow the file's name: "<ledger> is not an SQLite database"."""
    if not header:
        return "is an empty (0-byte) file, not a ledger"
    if not header.startswith(SQLITE_MAGIC):
        return "is not an SQLite database"
    if len(header) < SQLITE_HEADER_BYTES:
        return f"is truncated ({len(header)} bytes)"
    page_size = int.from_bytes(header[16:18], "big")
    if page_size != 1 and (page_size < 512 or page_size > 32768 or page_size & (page_size - 1)):
        return f"has a damaged SQLite header (page size {page_size})"
    return None


def check_ledger_file(path: str | Path) -> None:
    """Refuse an existing file at ``path`` that is not an SQLite database; a missing one is fine.

    SQLite takes an empty file for a new database, so a ledger truncated to 0 bytes (a full
    disk, a botched copy) or replaced by something else would silently start a new ledger,
    and the next first-contact merge bring back what users had removed. Raises
    LedgerFileError with one line naming the file, what is wrong and the fix.
    """
    path = str(path)
    if path == ":memory:":
        return
    try:
        with open(path, "rb") as handle:
            header = handle.read(SQLITE_HEADER_BYTES)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        raise LedgerFileError(
            f"the ledger {path} is a directory, not a file; point ledger: at a file"
        ) from None
    except OSError as err:
        raise LedgerFileError(f"cannot read the ledger {path}: {err.strerror or err}") from None
    problem = sqlite_header_problem(header)
    if problem is not None:
        raise LedgerFileError(
            f"the ledger {path} {problem}; restore it from a backup, or move it away to start "
            "a new ledger"
        )


def _file_identity(path: str) -> tuple[int, int]:
    """(device, inode) of the file at ``path``."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def take_writer_lock(path: str) -> int | None:
    """Take the single-writer lock of the ledger at ``path``; return the descriptor holding it.

    The lock is an exclusive ``flock`` on ``<ledger>.lock`` (with the holder's pid in it),
    held while the ledger is open and released by the kernel when the process ends, however
    it ends. One writer only: each process keeps decoded ledger state in memory between
    transactions (:class:`_StateCache`), which another writer's changes would make stale.
    Raises LedgerInUseError naming the holder. On systems without ``fcntl`` nothing is locked.
    """
    if sys.platform == "win32":  # pragma: no cover - not a supported platform for the service
        return None
    import fcntl

    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise LedgerInUseError(
            f"the ledger {path} is in use by another jfsync process (pid {holder}); stop "
            "it first, or use --dry-run (it works on a copy)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Outcome(StrEnum):
    """What an observation turned out to be."""

    ECHO = "echo"
    STALE = "stale"
    #: An event the echo rule cannot attribute (a stale event or the user taking a write
    #: back): nothing applied; the caller reads the item from the server and applies that.
    AMBIGUOUS = "ambiguous"
    #: A read requested before something the ledger already knows of that key: not applied.
    OUTDATED = "outdated"
    UNCHANGED = "unchanged"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class Observation:
    """A state ``server`` holds for ``user`` and ``item`` (canonical keys), seen at ``wall_ms``.

    ``source`` says how it was seen: a websocket ``event``, a ``scan`` page, the pusher's
    ``compare`` read before a write, or a ``read`` of the item that settles an ambiguous
    event. Only events consume pending echoes. For every read (scan, compare, read),
    ``wall_ms`` must be the time the read was *requested*, and ``read_seq`` the ticket
    :meth:`Ledger.ticket` gave just before it was requested: a read older than what the ledger
    already learnt of that (server, user, item) is never applied (:attr:`Outcome.OUTDATED`).
    A read without a ticket is taken as fresh.
    """

    server: str
    user: str
    item: str
    state: UserData
    wall_ms: int
    source: Source = "event"
    read_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one observation did (for logs, metrics and tests)."""

    observation: Observation
    outcome: Outcome
    #: Synced registers that differed from what jfsync knew of that server.
    changed: frozenset[Register] = frozenset()
    first_contact: bool = False
    #: Registers whose canonical value moved.
    canonical_changed: frozenset[Register] = frozenset()
    stamp: Stamp | None = None
    #: Outbox rows this observation created, changed or emptied: the registers each now holds
    #: (an empty set: the row is gone because nothing is owed any more).
    queued: dict[str, frozenset[Register]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending write: the registers owed to ``peer`` for ``user`` and ``item``."""

    id: int
    peer: str
    user: str
    item: str
    registers: frozenset[Register]
    desired: UserData
    version: int
    created_ms: int
    attempts: int
    next_attempt_ms: int
    last_error: str | None
    dead: bool
    #: The peer's own ids when the id maps know them (else use the canonical keys).
    remote_user_id: str | None = None
    remote_item_id: str | None = None

    def intended(self, current: UserData) -> UserData:
        """Return ``current`` with this row's registers set to their desired values."""
        result = current
        for register in self.registers:
            result = result.with_register(register, self.desired.get(register))
        return result


@dataclass(frozen=True, slots=True)
class ItemMapping:
    """How one server item maps to a canonical item, with what identity matching needs."""

    remote_id: str
    item: str
    item_type: str | None = None
    path: str | None = None
    provider_ids: dict[str, str] | None = None


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


_Key = tuple[int, int, int]  # (user, item, server)
_Pair = tuple[int, int]  # (user, item)


@dataclass(frozen=True, slots=True)
class _Row:
    """An outbox row while a transaction works on it (replaced, never changed in place)."""

    id: int | None
    mask: frozenset[Register]
    desired: UserData
    version: int
    created_ms: int
    attempts: int = 0
    next_attempt_ms: int = 0
    last_error: str | None = None
    dead: bool = False

    # Built field by field: dataclasses.replace costs several times more, on a hot path.
    def numbered(self, row_id: int) -> _Row:
        """This row with the id SQLite will store it under."""
        return _Row(
            row_id,
            self.mask,
            self.desired,
            self.version,
            self.created_ms,
            self.attempts,
            self.next_attempt_ms,
            self.last_error,
            self.dead,
        )

    def owing(self, mask: frozenset[Register], desired: UserData, version: int) -> _Row:
        """This row owing ``mask`` of ``desired`` as of ``version`` (the rest kept)."""
        return _Row(
            self.id,
            mask,
            desired,
            version,
            self.created_ms,
            self.attempts,
            self.next_attempt_ms,
            self.last_error,
            self.dead,
        )


#: Keys whose last-seen ticket is kept before old ones are dropped, and how many tickets back
#: they are kept then: a read that waited through that many newer events and writes is taken
#: as fresh for the keys dropped (as before read tickets existed).
SEEN_KEYS_MAX = 100_000
SEEN_KEEP_TICKETS = 100_000

#: (user, item) pairs whose decoded state the ledger keeps between transactions. A burst of
#: 10,000 changes stays inside it; at about 1.5 KB a pair it costs some 30 MB when full.
STATE_CACHE_PAIRS = 20_000


class _Cached:
    """Everything the ledger holds for one (user, item) pair, decoded, by server id."""

    __slots__ = ("canon", "echo", "lk", "rows")

    def __init__(self, canon: CanonicalState | None) -> None:
        # A plain class: thousands are built per burst, and a dataclass with default
        # factories costs several times more to construct.
        self.canon = canon
        self.lk: dict[int, UserData] = {}
        self.echo: dict[int, tuple[PendingWrite, ...]] = {}
        self.rows: dict[int, _Row] = {}


class _StateCache:
    """Decoded state of recently used (user, item) pairs, kept between transactions.

    A pair held here is known completely: its canonical state (or that it has none) and, for
    every server, its last-known state, pending echoes and outbox row (or their absence).
    Every transaction that works on pairs (applying observations, comparing before writes,
    recording intents and acks) reads them from here instead of reloading and decoding the
    same rows from SQLite, and writes its changes back after flushing them to SQLite. Any
    other write to those tables, and any transaction that does not commit, empties it, so
    it never holds what the file does not. Which servers have each user and map each item
    is kept too, until a mapping changes. Bounded to ``limit`` pairs, least recently used
    dropped first.
    """

    def __init__(self, limit: int = STATE_CACHE_PAIRS) -> None:
        self.limit = limit
        self.pairs: OrderedDict[_Pair, _Cached] = OrderedDict()
        #: User id -> the servers that have that user.
        self.members: dict[int, frozenset[int]] = {}
        #: Indexed servers (None: not read yet) and, per item id, the indexed servers mapping it
        #: (emptied when it would pass ``limit`` items).
        self.indexed: frozenset[int] | None = None
        self.mapped: dict[int, frozenset[int]] = {}

    def clear(self) -> None:
        """Forget everything (after a write that bypassed the cache, or a rollback)."""
        self.pairs.clear()
        self.forget_mappings()

    def forget_mappings(self) -> None:
        """Forget which servers have which users and items (after a mapping changed)."""
        self.members.clear()
        self.indexed = None
        self.mapped.clear()

    def evict(self, pair: _Pair) -> None:
        """Forget one pair."""
        self.pairs.pop(pair, None)

    def fill(self, batch: _Batch, pairs: Iterable[_Pair]) -> set[_Pair]:
        """Copy the held pairs into ``batch``; return those it must read from SQLite."""
        missing: set[_Pair] = set()
        held = self.pairs
        for pair in pairs:
            entry = held.get(pair)
            if entry is None:
                missing.add(pair)
                continue
            held.move_to_end(pair)
            uid, iid = pair
            if entry.canon is not None:
                batch.canon[pair] = entry.canon
            for sid, state in entry.lk.items():
                batch.lk[(uid, iid, sid)] = state
            for sid, pending in entry.echo.items():
                batch.echo[(uid, iid, sid)] = pending
            for sid, row in entry.rows.items():
                key = (uid, iid, sid)
                batch.rows[key] = row
                assert row.id is not None  # flushed rows are numbered
                batch._loaded_rows[key] = row.id
        return missing

    def store(self, batch: _Batch, pairs: set[_Pair]) -> None:
        """Hold ``pairs`` as ``batch`` just read them from SQLite (before any change)."""
        entries = {pair: _Cached(batch.canon.get(pair)) for pair in pairs}
        for (uid, iid, sid), state in batch.lk.items():
            entry = entries.get((uid, iid))
            if entry is not None:
                entry.lk[sid] = state
        for (uid, iid, sid), pending in batch.echo.items():
            entry = entries.get((uid, iid))
            if entry is not None:
                entry.echo[sid] = pending
        for (uid, iid, sid), row in batch.rows.items():
            entry = entries.get((uid, iid))
            if entry is not None and row is not None:
                entry.rows[sid] = row
        self.pairs.update(entries)
        self._trim()

    def absorb(self, batch: _Batch) -> None:
        """Take what ``batch`` has just flushed to SQLite into the pairs held."""
        held = self.pairs
        for pair in batch._dirty_canon:
            entry = held.get(pair)
            if entry is not None:
                entry.canon = batch.canon.get(pair)
        for uid, iid, sid in batch._dirty_lk:
            entry = held.get((uid, iid))
            if entry is not None:
                entry.lk[sid] = batch.lk[(uid, iid, sid)]
        for uid, iid, sid in batch._dirty_echo:
            entry = held.get((uid, iid))
            if entry is not None:
                pending = batch.echo[(uid, iid, sid)]
                if pending:
                    entry.echo[sid] = pending
                else:
                    entry.echo.pop(sid, None)
        for key in batch._dirty_rows:
            uid, iid, sid = key
            entry = held.get((uid, iid))
            if entry is None:
                continue
            row = batch.rows[key]
            if row is None:
                entry.rows.pop(sid, None)
            else:
                entry.rows[sid] = row

    def _trim(self) -> None:
        while len(self.pairs) > self.limit:
            self.pairs.popitem(last=False)


class Ledger:
    """The SQLite ledger; open with ``async with Ledger(path, policy) as ledger``."""

    def __init__(
        self,
        path: str | Path,
        policy: MergePolicy,
        *,
        cache_pairs: int = STATE_CACHE_PAIRS,
        user_map: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        self._path = str(path)
        self._policy = policy
        #: The config's users.map: with it, open() moves positional map keys to stable ones.
        self._user_map = user_map
        self._db: aiosqlite.Connection | None = None
        #: Every use of the connection holds its lock; writes go through its transactions.
        self._gate = WriteGate()
        self._server_ids: dict[str, int] = {}
        self._server_names: dict[int, str] = {}
        self._user_ids: dict[str, int] = {}
        self._item_ids: dict[str, int] = {}
        self._clock_ms = 0
        self._cache = _StateCache(cache_pairs)
        #: When the ledger last learnt anything of each (user, item, server), as a ticket
        #: (:meth:`ticket`: a counter, so no two moments tie the way wall milliseconds can):
        #: an event applied, a compare read or read-back requested, a write acked. A read whose
        #: ticket is older is outdated. In memory only: after a restart every read is newer.
        self._seen: dict[_Key, int] = {}
        self._tickets = 0
        #: The descriptor holding the ledger file's single-writer lock, while open.
        self._writer_lock: int | None = None
        #: (device, inode) of the file opened, checked before every write transaction.
        self._identity: tuple[int, int] | None = None
        #: Why the file at the path is no longer the one open (then nothing more is written).
        self._lost: str | None = None
        #: Told, once, why the ledger stopped taking writes (the service stops on it).
        self.file_lost_observers: list[Callable[[str], None]] = []

    def __repr__(self) -> str:
        return f"Ledger({self._path!r}, open={self._db is not None})"

    # ------------------------------------------------------------------ lifecycle

    @property
    def policy(self) -> MergePolicy:
        """The merge policy this ledger applies."""
        return self._policy

    @property
    def clock_ms(self) -> int:
        """The hybrid clock's last value (the latest stamp handed out)."""
        return self._clock_ms

    async def open(self) -> Self:
        """Connect, migrate the schema, register the configured servers, load the clock.

        An existing file that is not an SQLite database (0 bytes included) is refused
        (LedgerFileError); a missing one is created. The file's identity (device, inode) is
        recorded: every write transaction first checks that the path still names it
        (:meth:`verify_file`).
        """
        if self._db is not None:
            return self
        new_file = False
        if self._path != ":memory:":
            self._writer_lock = take_writer_lock(self._path)
            try:
                check_ledger_file(self._path)
            except BaseException:
                self._release_writer_lock()
                raise
            new_file = not os.path.exists(self._path)  # noqa: ASYNC240 - one stat, like the lock
        try:
            db = await connect(self._path)
        except BaseException:
            self._release_writer_lock()
            raise
        try:
            if new_file:
                # It holds every user's token: the owner's only. SQLite creates the -wal and
                # -shm files (in prepare) with the mode of the database file.
                os.chmod(self._path, 0o600)
            if self._path != ":memory:":
                await prepare(db)
                self._identity = _file_identity(self._path)
                self._lost = None
            else:
                await db.execute("PRAGMA foreign_keys=ON")
            applied = await migrate(db)
            if applied:
                logger.info("ledger %s: applied schema migrations %s", self._path, applied)
            await db.execute("BEGIN IMMEDIATE")
            await db.executemany(
                "INSERT INTO servers(name) VALUES (?) ON CONFLICT(name) DO NOTHING",
                [(name,) for name in self._policy.servers],
            )
            await db.execute(
                "INSERT INTO meta(key, value) VALUES ('clock_ms', 0) ON CONFLICT DO NOTHING"
            )
            await db.commit()
            if self._user_map is not None:
                await self._migrate_map_keys(db, self._user_map)
            for sid, name in await db.execute_fetchall("SELECT id, name FROM servers"):
                self._server_ids[name] = sid
                self._server_names[sid] = name
            rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE key='clock_ms'"))
            self._clock_ms = int(rows[0][0])
        except BaseException:
            await db.close()
            self._release_writer_lock()
            raise
        self._db = db
        return self

    async def _migrate_map_keys(
        self, db: aiosqlite.Connection, entries: Sequence[Mapping[str, str]]
    ) -> None:
        """Give people of positional ``users.map`` keys (``map:0``) their stable keys.

        A one-time data migration, run at open with the config's map at hand (SQL alone
        cannot derive the keys: they come from the config's entries). Each old key goes to the
        entry naming the accounts the ledger recorded for it (:func:`plan_map_key_migration`),
        whatever position that entry has now; the row keeps its id, so every canonical state,
        last-known state and outbox row stays with that person. Idempotent: new keys never
        look positional.
        """
        rows = await db.execute_fetchall(
            "SELECT u.id, u.key, s.name, su.name FROM users u "
            "LEFT JOIN server_users su ON su.user = u.id "
            "LEFT JOIN servers s ON s.id = su.server WHERE u.key GLOB 'map:[0-9]*'"
        )
        old: dict[str, dict[str, str | None]] = {}
        ids: dict[str, int] = {}
        for uid, key, server, name in rows:
            if not is_positional_map_key(str(key)):
                continue
            ids[str(key)] = int(uid)
            accounts = old.setdefault(str(key), {})
            if server is not None:
                accounts[str(server)] = None if name is None else str(name)
        if not old:
            return
        renames, problems = plan_map_key_migration(old, entries)
        for problem in problems:
            logger.info("ledger %s: %s", self._path, problem)
        taken = {
            str(r[0])
            for r in await db.execute_fetchall(
                f"SELECT key FROM users WHERE key IN ({_marks(len(renames))})",  # noqa: S608
                list(renames.values()),
            )
        }
        for key in [k for k, new in renames.items() if new in taken]:
            logger.warning(
                "ledger %s: user %s stays as it is: %s is in the ledger already",
                self._path,
                key,
                renames.pop(key),
            )
        if not renames:
            return
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.executemany(
                "UPDATE users SET key=? WHERE id=?",
                [(new, ids[key]) for key, new in renames.items()],
            )
        except BaseException:
            await db.rollback()
            raise
        await db.commit()
        logger.info(
            "ledger %s: users.map keys now follow each entry's names, not its position: %s",
            self._path,
            ", ".join(f"{key} -> {new}" for key, new in sorted(renames.items())),
        )

    async def close(self) -> None:
        """Close the connection and give up the file (idempotent)."""
        db, self._db = self._db, None
        if db is not None:
            async with self._gate.lock:
                await db.close()
        self._release_writer_lock()

    def file_problem(self) -> str | None:
        """Why the file at the ledger path is not the file this ledger writes, or None.

        One ``os.stat``: the path must still name the file (device and inode) opened.
        """
        if self._lost is not None:
            return self._lost
        if self._identity is None:
            return None
        try:
            identity = _file_identity(self._path)
        except FileNotFoundError:
            return (
                f"the ledger file {self._path} was deleted while jfsync had it open; nothing "
                "more is written to it (restore the file and restart jfsync, or restart to "
                "begin a new ledger)"
            )
        except OSError as err:
            return f"cannot check the ledger file {self._path}: {err.strerror or err}"
        if identity != self._identity:
            return (
                f"the ledger file {self._path} was replaced by another file while jfsync had "
                "it open; nothing more is written to either (restart jfsync to use the file "
                "now at that path)"
            )
        return None

    def verify_file(self) -> None:
        """Raise LedgerFileLostError when the path no longer names the file open.

        The first time, every :attr:`file_lost_observers` is told why; from then on every
        write is refused, even if the file comes back.
        """
        if self._lost is None:
            problem = self.file_problem()
            if problem is None:
                return
            self._lost = problem
            for observer in list(self.file_lost_observers):
                try:
                    observer(problem)
                except Exception:
                    logger.exception("telling about the lost ledger file failed")
        raise LedgerFileLostError(self._lost)

    def _release_writer_lock(self) -> None:
        lock, self._writer_lock = self._writer_lock, None
        if lock is not None:
            os.close(lock)  # closing the descriptor releases the lock

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
        async with self._tx() as db:
            self._cache.forget_mappings()
            sid = self._sid(server)
            uid = (await self._ensure_ids(db, "users", [user]))[user]
            await db.execute("DELETE FROM server_users WHERE server=? AND user=?", (sid, uid))
            await db.execute(
                "INSERT OR REPLACE INTO server_users(server, remote_id, user, name) "
                "VALUES (?, ?, ?, ?)",
                (sid, remote_user_id, uid, name),
            )

    async def map_items(self, server: str, mappings: Iterable[ItemMapping]) -> None:
        """Record several server items as canonical items (replacing older mappings)."""
        entries = list(mappings)
        if not entries:
            return
        async with self._tx() as db:
            sid = self._sid(server)
            await self._write_mappings(db, sid, entries)

    async def _write_mappings(
        self, db: aiosqlite.Connection, sid: int, mappings: Sequence[ItemMapping]
    ) -> None:
        """Record ``mappings`` of server ``sid``, replacing what mapped the same items."""
        self._cache.forget_mappings()
        ids = await self._ensure_ids(db, "items", [m.item for m in mappings])
        await db.executemany(
            "DELETE FROM server_items WHERE server=? AND item=?",
            [(sid, ids[m.item]) for m in mappings],
        )
        await db.executemany(
            "INSERT OR REPLACE INTO server_items(server, remote_id, item, item_type, path, "
            "provider_ids) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    sid,
                    m.remote_id,
                    ids[m.item],
                    m.item_type,
                    m.path,
                    json.dumps(m.provider_ids, sort_keys=True) if m.provider_ids else None,
                )
                for m in mappings
            ],
        )

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
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT u.key FROM server_users s JOIN users u ON u.id = s.user "
                "WHERE s.server=? AND s.remote_id=?",
                (self._sid(server), remote_user_id),
            )
            return next((str(r[0]) for r in rows), None)

    async def item_for(self, server: str, remote_item_id: str) -> str | None:
        """Return the canonical item of a server's item id, if mapped."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT i.key FROM server_items s JOIN items i ON i.id = s.item "
                "WHERE s.server=? AND s.remote_id=?",
                (self._sid(server), remote_item_id),
            )
            return next((str(r[0]) for r in rows), None)

    async def servers_with_user(self, user: str) -> list[str]:
        """Return the servers (config order) that have the canonical user ``user``."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT s.server FROM server_users s JOIN users u ON u.id = s.user WHERE u.key=?",
                (user,),
            )
            names = {self._server_names[int(r[0])] for r in rows}
            return sorted(names, key=self._policy.rank)

    # ------------------------------------------------------------------ identity changes

    async def remap_items(
        self,
        server: str,
        *,
        mappings: Sequence[ItemMapping] = (),
        unmapped: Sequence[str] = (),
        forget: Sequence[str] = (),
    ) -> None:
        """Change the server's item id map in ONE transaction, for identity matching.

        First what jfsync knew of ``server`` for the canonical items ``forget`` goes (every
        user's last-known state and pending echoes: the server item behind them changed or
        left, so the next observation there is a first contact); then the mappings of the
        server's ids ``unmapped`` are dropped; then ``mappings`` are recorded as
        :meth:`map_items` records them.
        """
        async with self._tx() as db:
            self._cache.clear()
            sid = self._sid(server)
            for chunk in _chunks(sorted(set(forget)), _CHUNK):
                marks = _marks(len(chunk))
                for table in ("last_known", "pending_echo"):
                    await db.execute(
                        f"DELETE FROM {table} WHERE server=? AND item IN "  # noqa: S608
                        f"(SELECT id FROM items WHERE key IN ({marks}))",
                        (sid, *chunk),
                    )
            for chunk in _chunks(sorted(set(unmapped)), _CHUNK):
                marks = _marks(len(chunk))
                await db.execute(
                    f"DELETE FROM server_items WHERE server=? AND remote_id IN ({marks})",  # noqa: S608
                    (sid, *chunk),
                )
            if not mappings:
                return
            await self._write_mappings(db, sid, mappings)

    async def retire_items(self, items: Sequence[str]) -> list[str]:
        """Drop every trace of the canonical items among ``items`` that no server maps any more.

        Their canonical states, last-known states, pending echoes and outbox rows go (the keys
        stay: ids are never reused). Items that some server still maps are left alone. Returns
        the keys retired.
        """
        retired: list[str] = []
        async with self._tx() as db:
            self._cache.clear()
            for chunk in _chunks(sorted(set(items)), _CHUNK):
                rows = await db.execute_fetchall(
                    f"SELECT i.id, i.key FROM items i WHERE i.key IN ({_marks(len(chunk))}) "  # noqa: S608
                    "AND NOT EXISTS (SELECT 1 FROM server_items s WHERE s.item = i.id)",
                    chunk,
                )
                ids = [int(r[0]) for r in rows]
                retired += [str(r[1]) for r in rows]
                if not ids:
                    continue
                for table in ("canonical", "last_known", "pending_echo", "outbox"):
                    await db.execute(
                        f"DELETE FROM {table} WHERE item IN ({_marks(len(ids))})",  # noqa: S608
                        ids,
                    )
        return retired

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

    async def apply_observations(self, observations: Sequence[Observation]) -> list[Applied]:
        """Apply observations in order, all in ONE transaction, and report each outcome.

        Per observation: the echo rule (events consume pending echoes; reads only match
        them), the diff against the origin's last-known state, a hybrid-clock stamp when
        something changed, the merge, the new canonical and last-known states, and the outbox
        rows of the origin and of every server that has the user.
        """
        if not observations:
            return []
        async with self._tx() as db:
            batch = _Batch(self, db)
            sids = [self._sid(o.server) for o in observations]
            users = await self._ensure_ids(db, "users", [o.user for o in observations])
            items = await self._ensure_ids(db, "items", [o.item for o in observations])
            keys = [
                (users[o.user], items[o.item], sid)
                for o, sid in zip(observations, sids, strict=True)
            ]
            await batch.load({(u, i) for u, i, _ in keys})
            results = [batch.apply(o, k) for o, k in zip(observations, keys, strict=True)]
            await batch.flush()
            return results

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
        async with self._tx() as db:
            keys = await self._row_keys(db, [row for row, _ in reads])
            batch = _Batch(self, db)
            await batch.load({(u, i) for u, i, _ in keys})
            outdated: set[_Key] = set()
            synced = self._policy.synced
            for (row, current), key in zip(reads, keys, strict=True):
                known = batch.lk.get(key)
                if known == current:
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
                    regressed.append(row)
                    continue
                obs = Observation(
                    row.peer, row.user, row.item, current, asked_ms, "compare", asked_seq
                )
                if batch.apply(obs, key).outcome is Outcome.OUTDATED:
                    outdated.add(key)
            await batch.number_new_rows()
            fresh = [
                None if key in outdated else batch.outbox_row(key, row)
                for (row, _), key in zip(reads, keys, strict=True)
            ]
            if intents is not None:
                for still, (_, current), key in zip(fresh, reads, keys, strict=True):
                    if still is not None:
                        batch.record_intents(key, current, intents(still, current), wall_ms)
            await batch.flush()
            return fresh

    async def backfill(
        self, server: str, user: str, wall_ms: int, *, only_mapped: bool = False
    ) -> int:
        """Queue, for ``server``, every non-default canonical item of ``user`` it has no history of.

        Call it when a server (or a user on it) joins; the pusher's compare-before-write then
        merges whatever the server holds at first contact. With ``only_mapped`` only items the
        server maps (has) are queued. Returns the rows touched.
        """
        mapped = (
            "AND EXISTS (SELECT 1 FROM server_items s WHERE s.server=? AND s.item=c.item) "
            if only_mapped
            else ""
        )
        async with self._tx() as db:
            sid = self._sid(server)
            uid = (await self._ensure_ids(db, "users", [user]))[user]
            rows = await db.execute_fetchall(
                f"SELECT c.item FROM canonical c WHERE c.user=? {mapped}"  # noqa: S608 - fixed text
                "AND NOT EXISTS (SELECT 1 FROM last_known k WHERE k.user=c.user "
                "AND k.item=c.item AND k.server=?)",
                (uid, sid, sid) if only_mapped else (uid, sid),
            )
            pairs = {(uid, int(r[0])) for r in rows}
            if not pairs:
                return 0
            batch = _Batch(self, db)
            await batch.load(pairs)
            version = batch.tick(wall_ms)
            touched = 0
            for pair in sorted(pairs):
                canonical = batch.canon[pair]
                owed = frozenset(
                    r
                    for r in self._policy.synced
                    if canonical.data.get(r) != DEFAULT_USER_DATA.get(r)
                )
                if owed and batch.refresh_row((*pair, sid), owed, canonical.data, version, wall_ms):
                    touched += 1
            await batch.flush()
            return touched

    # ------------------------------------------------------------------ reads

    async def canonical(self, user: str, item: str) -> CanonicalState | None:
        """Return the canonical state of ``user`` and ``item``, if any."""
        async with self._read() as db:
            pair = self._known_pair(user, item) or await self._lookup_pair(db, user, item)
            if pair is None:
                return None
            batch = _Batch(self, db)
            await batch.load({pair}, with_members=False)
            return batch.canon.get(pair)

    async def last_known(self, server: str, user: str, item: str) -> UserData | None:
        """Return the state jfsync last knew ``server`` to hold for ``user`` and ``item``."""
        async with self._read() as db:
            pair = self._known_pair(user, item) or await self._lookup_pair(db, user, item)
            if pair is None:
                return None
            return await _Batch(self, db).load_one_last_known((*pair, self._sid(server)))

    async def last_known_for_user(self, server: str, user: str) -> dict[str, UserData]:
        """Return every last-known state of ``user`` on ``server``, by canonical item.

        A resync uses it to find known items missing from a scan of non-default items.
        """
        async with self._read() as db:
            rows = await db.execute_fetchall(
                f"SELECT i.key, {_STATE_COLS} FROM last_known k "  # noqa: S608 - fixed columns
                "JOIN users u ON u.id = k.user JOIN items i ON i.id = k.item "
                "WHERE k.server=? AND u.key=?",
                (self._sid(server), user),
            )
            return {str(r[0]): _state(r, 1) for r in rows}

    async def pending_echoes(self, server: str, user: str, item: str) -> tuple[PendingWrite, ...]:
        """Return the writes to ``server`` whose echo is still expected."""
        async with self._read() as db:
            pair = self._known_pair(user, item) or await self._lookup_pair(db, user, item)
            if pair is None:
                return ()
            rows = await db.execute_fetchall(
                "SELECT entries FROM pending_echo WHERE user=? AND item=? AND server=?",
                (*pair, self._sid(server)),
            )
            return next((_decode_echo(str(r[0])) for r in rows), ())

    async def forget_echoes(self, server: str, user: str) -> int:
        """Drop every pending echo of ``user`` on ``server``; return how many keys had some.

        Call it when that user's socket (re)connects, before the resync scan: events of the old
        socket can no longer arrive, so pending states would only risk swallowing a real change.
        """
        async with self._tx() as db:
            self._cache.clear()
            cursor = await db.execute(
                "DELETE FROM pending_echo WHERE server=? AND user IN "
                "(SELECT id FROM users WHERE key=?)",
                (self._sid(server), user),
            )
            count = cursor.rowcount
            await cursor.close()
            return count

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
        ids = sorted(set(exclude))
        in_sql, beyond = ids[:_CHUNK], set(ids[_CHUNK:])
        skip = f"AND o.id NOT IN ({_marks(len(in_sql))}) " if in_sql else ""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                _ROW_SELECT
                + "WHERE o.peer=? AND o.dead=0 AND o.next_attempt_ms<=? "
                + _NOT_HELD
                + skip
                + "ORDER BY o.next_attempt_ms, o.created_ms, o.id LIMIT ?",
                (self._sid(peer), now_ms, *in_sql, limit + len(beyond)),
            )
        kept = [r for r in rows if int(r[0]) not in beyond] if beyond else list(rows)
        return [_decode_row(r, self._server_names) for r in kept[:limit]]

    async def get_row(self, peer: str, user: str, item: str) -> OutboxRow | None:
        """Return the outbox row for ``peer``, ``user`` and ``item``, live or dead."""
        async with self._read() as db:
            pair = self._known_pair(user, item) or await self._lookup_pair(db, user, item)
            if pair is None:
                return None
            return (await self._select_rows(db, [(*pair, self._sid(peer))])).get(
                (*pair, self._sid(peer))
            )

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
        async with self._tx() as db:
            keys = await self._row_keys(db, [row for row, _, _ in intents])
            batch = _Batch(self, db)
            await batch.load({(u, i) for u, i, _ in keys}, with_members=False)
            for (_, base, states), key in zip(intents, keys, strict=True):
                batch.record_intents(key, base, states, wall_ms)
            await batch.flush()

    async def rows_written(
        self, acks: Sequence[tuple[OutboxRow, UserData]], wall_ms: int
    ) -> list[bool]:
        """Do :meth:`row_written` for several rows in ONE transaction."""
        if not acks:
            return []
        async with self._tx() as db:
            keys = await self._row_keys(db, [row for row, _ in acks])
            batch = _Batch(self, db)
            await batch.load({(u, i) for u, i, _ in keys}, with_members=False)
            done = [
                batch.written(key, row.version, state, wall_ms)
                for (row, state), key in zip(acks, keys, strict=True)
            ]
            await batch.flush()
            return done

    async def row_failed(self, row: OutboxRow, reason: str, retry_at_ms: int) -> None:
        """Record a failed attempt of ``row`` and when to try again (the row stays live)."""
        await self.rows_failed([row], reason, retry_at_ms)

    async def rows_failed(self, rows: Sequence[OutboxRow], reason: str, retry_at_ms: int) -> None:
        """Do :meth:`row_failed` for several rows with one reason, in ONE transaction."""
        if not rows:
            return
        async with self._tx() as db:
            for row in rows:
                self._forget_pair(row)
            await db.executemany(
                "UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt_ms=? WHERE id=?",
                [(reason, retry_at_ms, row.id) for row in rows],
            )

    async def row_dead(self, row: OutboxRow, reason: str) -> bool:
        """Park ``row`` as dead with ``reason``; False when a newer change replaced it (or it
        was parked already)."""
        async with self._tx() as db:
            self._forget_pair(row)
            cursor = await db.execute(
                "UPDATE outbox SET dead=1, attempts=attempts+1, last_error=? "
                "WHERE id=? AND version=? AND dead=0",
                (reason, row.id, row.version),
            )
            parked = cursor.rowcount == 1
            await cursor.close()
        if parked:
            logger.warning("[%s] parked write of %s/%s: %s", row.peer, row.user, row.item, reason)
        return parked

    async def retry_dead(self, peer: str) -> int:
        """Make every dead row of ``peer`` live and due now; return how many."""
        async with self._tx() as db:
            self._cache.clear()
            cursor = await db.execute(
                "UPDATE outbox SET dead=0, attempts=0, next_attempt_ms=0 WHERE peer=? AND dead=1",
                (self._sid(peer),),
            )
            count = cursor.rowcount
            await cursor.close()
            return count

    async def reset_backoff(self, peer: str) -> int:
        """Make every live row of ``peer`` due now (after the peer came back); return how many."""
        async with self._tx() as db:
            self._cache.clear()
            cursor = await db.execute(
                "UPDATE outbox SET next_attempt_ms=0 WHERE peer=? AND dead=0 AND next_attempt_ms>0",
                (self._sid(peer),),
            )
            count = cursor.rowcount
            await cursor.close()
            return count

    async def outbox_depth(self, peer: str) -> int:
        """Return how many live rows ``peer`` has queued."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT COUNT(*) FROM outbox WHERE peer=? AND dead=0", (self._sid(peer),)
            )
            return int(next(iter(rows))[0])

    async def oldest_age(self, peer: str, now_ms: int) -> float | None:
        """Return the age in seconds of the oldest live row of ``peer``, or None when empty."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT MIN(created_ms) FROM outbox WHERE peer=? AND dead=0", (self._sid(peer),)
            )
            oldest = next(iter(rows))[0]
            return None if oldest is None else max(0.0, (now_ms - int(oldest)) / 1000.0)

    async def dead_rows(self, peer: str) -> list[OutboxRow]:
        """Return the parked rows of ``peer`` with their reasons (``last_error``)."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                _ROW_SELECT + "WHERE o.peer=? AND o.dead=1 ORDER BY o.created_ms, o.id",
                (self._sid(peer),),
            )
            return [_decode_row(r, self._server_names) for r in rows]

    async def dead_summary(self, peer: str, limit: int) -> tuple[int, list[OutboxRow]]:
        """Return how many rows of ``peer`` are dead, and the oldest ``limit`` of them."""
        async with self._read() as db:
            sid = self._sid(peer)
            rows = await db.execute_fetchall(
                "SELECT COUNT(*) FROM outbox WHERE peer=? AND dead=1", (sid,)
            )
            count = int(next(iter(rows))[0])
            sample = await db.execute_fetchall(
                _ROW_SELECT + "WHERE o.peer=? AND o.dead=1 ORDER BY o.created_ms, o.id LIMIT ?",
                (sid, limit),
            )
            return count, [_decode_row(r, self._server_names) for r in sample]

    # ------------------------------------------------------------------ reset guard

    async def jellyfin_id(self, server: str) -> str | None:
        """Return the Jellyfin server id last seen under the config name ``server``."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT jellyfin_id FROM servers WHERE id=?", (self._sid(server),)
            )
            return next((None if r[0] is None else str(r[0]) for r in rows), None)

    async def remember_jellyfin_id(self, server: str, jellyfin_id: str) -> None:
        """Record the Jellyfin server id seen under the config name ``server``."""
        async with self._tx() as db:
            await db.execute(
                "UPDATE servers SET jellyfin_id=? WHERE id=?", (jellyfin_id, self._sid(server))
            )

    async def forget_server_history(self, server: str) -> int:
        """Forget what jfsync knew ``server`` to hold, for every user, in ONE transaction.

        Its last-known states, pending echoes and reset holds go; canonical states, id maps and
        queued rows stay. Every item it shows next is a first contact (merged, never taken as
        an edit). Returns how many last-known states were dropped.
        """
        async with self._tx() as db:
            self._cache.clear()
            sid = self._sid(server)
            cursor = await db.execute("DELETE FROM last_known WHERE server=?", (sid,))
            dropped = cursor.rowcount
            await cursor.close()
            await db.execute("DELETE FROM pending_echo WHERE server=?", (sid,))
            await db.execute("DELETE FROM reset_holds WHERE server=?", (sid,))
            return dropped

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
        async with self._tx() as db:
            sid = self._sid(server)
            uid = (await self._ensure_ids(db, "users", [user]))[user]
            items = await self._ensure_ids(db, "items", list(states))
            batch = _Batch(self, db)
            await batch.load({(uid, iid) for iid in items.values()})
            version = batch.tick(wall_ms)
            queued = 0
            for item in sorted(states):
                state = states[item]
                key = (uid, items[item], sid)
                batch._set_lk(key, state)
                canonical = batch.canon.get(key[:2])
                if canonical is None:
                    continue
                owed = frozenset(
                    r for r in self._policy.synced if canonical.data.get(r) != state.get(r)
                )
                if owed and batch.refresh_row(key, owed, canonical.data, version, wall_ms):
                    queued += 1
            await batch.flush()
            return queued

    async def reset_holds(self) -> list[ResetHold]:
        """Return every (server, user) the reset guard holds, oldest first."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT h.server, u.key, su.name, h.items, h.known, h.since_ms, h.resolution "
                "FROM reset_holds h JOIN users u ON u.id = h.user "
                "LEFT JOIN server_users su ON su.server = h.server AND su.user = h.user "
                "ORDER BY h.since_ms, h.server, u.key"
            )
        return [
            ResetHold(
                server=self._server_names[int(r[0])],
                user=str(r[1]),
                name=None if r[2] is None else str(r[2]),
                items=int(r[3]),
                known=int(r[4]),
                since_ms=int(r[5]),
                resolution=None if r[6] is None else str(r[6]),
            )
            for r in rows
            if int(r[0]) in self._server_names
        ]

    async def hold_reset(
        self, server: str, user: str, *, items: int, known: int, since_ms: int
    ) -> None:
        """Hold ``user`` on ``server``: nothing is delivered to it until a resolution."""
        async with self._tx() as db:
            uid = (await self._ensure_ids(db, "users", [user]))[user]
            await db.execute(
                "INSERT INTO reset_holds(server, user, items, known, since_ms, resolution) "
                "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(server, user) DO NOTHING",
                (self._sid(server), uid, items, known, since_ms),
            )

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
        async with self._tx() as db:
            sid = self._sid(server)
            for hold in held:
                await db.execute(
                    "UPDATE reset_holds SET resolution=? WHERE server=? AND user="
                    "(SELECT id FROM users WHERE key=?)",
                    (resolution, sid, hold.user),
                )
        return [replace(h, resolution=resolution) for h in held]

    async def drop_reset_hold(self, server: str, user: str) -> bool:
        """Drop the hold of ``user`` on ``server`` (its resolution was applied)."""
        async with self._tx() as db:
            cursor = await db.execute(
                "DELETE FROM reset_holds WHERE server=? "
                "AND user=(SELECT id FROM users WHERE key=?)",
                (self._sid(server), user),
            )
            dropped = cursor.rowcount == 1
            await cursor.close()
            return dropped

    # ------------------------------------------------------------------ tokens (TokenStore)

    async def load_token(self, server_id: str, user_id: str) -> str | None:
        """Return the stored token of a user on a server, if any."""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT token FROM tokens WHERE server=? AND user=?", (server_id, user_id)
            )
            return next((str(r[0]) for r in rows), None)

    async def save_token(self, server_id: str, user_id: str, token: str) -> None:
        """Store (or replace) the token of a user on a server."""
        async with self._tx() as db:
            await db.execute(
                "INSERT OR REPLACE INTO tokens(server, user, token) VALUES (?, ?, ?)",
                (server_id, user_id, token),
            )

    async def forget_token(self, server_id: str, user_id: str) -> None:
        """Delete the stored token of a user on a server."""
        async with self._tx() as db:
            await db.execute("DELETE FROM tokens WHERE server=? AND user=?", (server_id, user_id))

    # ------------------------------------------------------------------ checks

    async def check_invariants(self) -> list[str]:
        """Return every broken ledger invariant as a readable line (empty when sound).

        Checked: SQLite integrity and foreign keys; the clock is at or after every stamp and
        row version; every outbox row owes at least one synced register; and for every server
        that has the user and a last-known state, each synced register either equals the
        canonical value or is owed by that server's outbox row with the canonical value.
        """
        problems: list[str] = []
        async with self._read() as db:
            integrity = [str(r[0]) for r in await db.execute_fetchall("PRAGMA integrity_check")]
            if integrity != ["ok"]:
                problems.append(f"integrity_check: {integrity}")
            fk = list(await db.execute_fetchall("PRAGMA foreign_key_check"))
            if fk:
                problems.append(f"foreign_key_check: {len(fk)} rows")
            stored = list(await db.execute_fetchall("SELECT value FROM meta WHERE key='clock_ms'"))
            clock = int(stored[0][0])
            highest = next(
                iter(
                    await db.execute_fetchall(
                        "SELECT MAX(m) FROM (SELECT MAX(favorite_ms, rating_ms, play_state_ms) "
                        "AS m FROM canonical UNION ALL SELECT MAX(version) FROM outbox)"
                    )
                )
            )[0]
            if highest is not None and int(highest) > clock:
                problems.append(f"clock {clock} is behind a stored stamp {highest}")
            synced_bits = _mask_bits(self._policy.synced)
            for rid, bits in await db.execute_fetchall("SELECT id, registers FROM outbox"):
                if int(bits) == 0 or int(bits) & ~synced_bits:
                    problems.append(f"outbox row {rid} has registers {bits}")
            batch = _Batch(self, db, cached=False)
            pairs = {
                (int(u), int(i))
                for u, i in await db.execute_fetchall("SELECT user, item FROM canonical")
            }
            await batch.load(pairs)  # from the file itself: see _Batch(cached=False) above
            configured = {self._server_ids[n] for n in self._policy.servers}
            for (uid, iid), canonical in sorted(batch.canon.items()):
                for sid in sorted(batch.members.get(uid, set()) & configured):
                    known = batch.lk.get((uid, iid, sid))
                    if known is None:
                        continue
                    row = batch.rows.get((uid, iid, sid))
                    for register in _ordered(self._policy.synced):
                        want = canonical.data.get(register)
                        if known.get(register) == want:
                            continue
                        if (
                            row is None
                            or register not in row.mask
                            or row.desired.get(register) != want
                        ):
                            problems.append(
                                f"{self._server_names[sid]} user#{uid} item#{iid}: {register} "
                                f"is {known.get(register)!r}, canonical {want!r}, not queued"
                            )
        return problems

    # ------------------------------------------------------------------ internals

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        db = self._require()
        async with self._gate.lock:
            yield db

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._gate.transaction(self._require(), self._forget_uncommitted) as db:
            # Under the lock, before anything is written: never into a file nobody sees.
            self.verify_file()
            yield db

    def _forget_uncommitted(self) -> None:
        """After a failed transaction: ids it handed out no longer exist, and the cache may
        hold what it flushed."""
        self._user_ids.clear()
        self._item_ids.clear()
        self._cache.clear()

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise LedgerError(f"the ledger {self._path} is not open")
        return self._db

    def _sid(self, server: str) -> int:
        try:
            return self._server_ids[server]
        except KeyError:
            raise LedgerError(
                f"unknown server {server!r}; the ledger knows {', '.join(self._server_ids)}"
            ) from None

    def ticket(self) -> int:
        """A number larger than every one handed out before: take one just before a read is
        requested and pass it as the read's ``read_seq``."""
        self._tickets += 1
        return self._tickets

    def _note_seen(self, seen: dict[_Key, int]) -> None:
        """Keep what a transaction learnt of when each key was last seen; stay bounded."""
        known = self._seen
        for key, seq in seen.items():
            if seq > known.get(key, 0):
                known[key] = seq
        if len(known) > SEEN_KEYS_MAX:
            horizon = self._tickets - SEEN_KEEP_TICKETS
            self._seen = {k: v for k, v in known.items() if v >= horizon}

    def _tick(self, wall_ms: int) -> int:
        """Advance the hybrid clock (persisted by the caller's transaction)."""
        self._clock_ms = next_stamp_ms(wall_ms, self._clock_ms)
        return self._clock_ms

    def _forget_pair(self, row: OutboxRow) -> None:
        """Drop a row's pair from the cache before writing the row outside a batch."""
        pair = self._known_pair(row.user, row.item)
        if pair is None:
            # Ids not known in this process: the pair was never cached under them either,
            # unless the id maps were cleared since; be safe.
            self._cache.clear()
        else:
            self._cache.evict(pair)

    def _known_pair(self, user: str, item: str) -> _Pair | None:
        uid = self._user_ids.get(user)
        iid = self._item_ids.get(item)
        return None if uid is None or iid is None else (uid, iid)

    async def _lookup_pair(self, db: aiosqlite.Connection, user: str, item: str) -> _Pair | None:
        urows = list(await db.execute_fetchall("SELECT id FROM users WHERE key=?", (user,)))
        irows = list(await db.execute_fetchall("SELECT id FROM items WHERE key=?", (item,)))
        if not urows or not irows:
            return None
        return int(urows[0][0]), int(irows[0][0])

    async def _ensure_ids(
        self, db: aiosqlite.Connection, table: Literal["users", "items"], keys: Iterable[str]
    ) -> dict[str, int]:
        cache = self._user_ids if table == "users" else self._item_ids
        wanted = set(keys)
        missing = [k for k in wanted if k not in cache]
        if missing:
            await db.executemany(
                f"INSERT INTO {table}(key) VALUES (?) ON CONFLICT(key) DO NOTHING",  # noqa: S608
                [(k,) for k in missing],
            )
            for chunk in _chunks(missing, _CHUNK):
                rows = await db.execute_fetchall(
                    f"SELECT key, id FROM {table} WHERE key IN ({_marks(len(chunk))})",  # noqa: S608
                    chunk,
                )
                for key, rid in rows:
                    cache[str(key)] = int(rid)
        return {k: cache[k] for k in wanted}

    async def _row_keys(self, db: aiosqlite.Connection, rows: Sequence[OutboxRow]) -> list[_Key]:
        """The (user, item, peer) ids of each row, in order."""
        users = self._user_ids
        items = self._item_ids
        if any(r.user not in users or r.item not in items for r in rows):
            users = await self._ensure_ids(db, "users", [r.user for r in rows])
            items = await self._ensure_ids(db, "items", [r.item for r in rows])
        return [(users[r.user], items[r.item], self._sid(r.peer)) for r in rows]

    async def _select_rows(
        self, db: aiosqlite.Connection, keys: Iterable[_Key]
    ) -> dict[_Key, OutboxRow]:
        """Read the outbox rows of the given (user, item, peer) keys that exist."""
        grouped: dict[tuple[int, int], list[int]] = defaultdict(list)
        for uid, iid, sid in set(keys):
            grouped[(sid, uid)].append(iid)
        found: dict[_Key, OutboxRow] = {}
        for (sid, uid), items in grouped.items():
            for chunk in _chunks(sorted(items), _CHUNK):
                rows = await db.execute_fetchall(
                    _ROW_SELECT + "WHERE o.peer=? AND o.user=? "
                    f"AND o.item IN ({_marks(len(chunk))})",
                    (sid, uid, *chunk),
                )
                for r in rows:
                    found[(int(r[19]), int(r[20]), int(r[1]))] = _decode_row(r, self._server_names)
        return found

    # ------------------------------------------------------------------ issue 14: live policy
    # (config reload, mode: send/receive, per-user register choices)

    #: User id -> the registers that person syncs, for people with their own choices.
    _fields_by_uid: Mapping[int, frozenset[Register]] = MappingProxyType({})

    async def set_policy(self, policy: MergePolicy) -> None:
        """Apply a new merge policy from the next transaction on (a config reload).

        Servers it names that the ledger does not know yet are registered; the people with
        register choices of their own get their ids. Rows already queued are left as they
        are: :meth:`prune_outbox` brings them in line.
        """
        users = [u for u, _ in policy.user_fields]
        async with self._tx() as db:
            await db.executemany(
                "INSERT INTO servers(name) VALUES (?) ON CONFLICT(name) DO NOTHING",
                [(name,) for name in policy.servers],
            )
            ids = await self._ensure_ids(db, "users", users) if users else {}
            for sid, name in await db.execute_fetchall("SELECT id, name FROM servers"):
                self._server_ids[str(name)] = int(sid)
                self._server_names[int(sid)] = str(name)
        self._fields_by_uid = MappingProxyType({ids[u]: fields for u, fields in policy.user_fields})
        self._policy = policy
        self._cache.forget_mappings()

    def _synced_of(self, uid: int, sid: int) -> frozenset[Register]:
        """The registers that may be owed to server ``sid`` for user ``uid`` (none: send-only)."""
        policy = self._policy
        if policy.send_only and self._server_names.get(sid) in policy.send_only:
            return frozenset()
        return self._fields_by_uid.get(uid, policy.synced)

    async def prune_outbox(self) -> dict[str, int]:
        """Bring queued rows in line with the policy; return rows dropped per peer.

        Rows owed to servers no longer configured, or with ``mode: send``, are dropped whole;
        registers no longer synced (for everyone, or for that person) are taken out of the
        others, and a row left with none is dropped.
        """
        dropped: dict[str, int] = {}
        async with self._tx() as db:
            rows = await db.execute_fetchall("SELECT id, peer, user, registers FROM outbox")
            gone: list[tuple[int]] = []
            narrowed: list[tuple[int, int]] = []
            configured = set(self._policy.servers)
            for rid, peer, uid, bits in rows:
                name = self._server_names.get(int(peer), str(peer))
                allowed = (
                    _mask_bits(self._synced_of(int(uid), int(peer))) if name in configured else 0
                )
                left = int(bits) & allowed
                if left == 0:
                    gone.append((int(rid),))
                    dropped[name] = dropped.get(name, 0) + 1
                elif left != int(bits):
                    narrowed.append((left, int(rid)))
            if gone:
                await db.executemany("DELETE FROM outbox WHERE id=?", gone)
            if narrowed:
                await db.executemany("UPDATE outbox SET registers=? WHERE id=?", narrowed)
            if gone or narrowed:
                self._cache.clear()  # the cached rows no longer match the file
        return dropped

    async def mark_away(self) -> list[str]:
        """Remember every server with history that the policy no longer names; return them.

        While away it is owed nothing, so when it comes back (:meth:`rejoined`) what changed
        meanwhile must be queued for it again (:meth:`requeue_differences`).
        """
        configured = set(self._policy.servers)
        async with self._tx() as db:
            rows = await db.execute_fetchall(
                "SELECT s.name FROM servers s WHERE EXISTS "
                "(SELECT 1 FROM last_known k WHERE k.server=s.id)"
            )
            away = sorted(str(r[0]) for r in rows if str(r[0]) not in configured)
            await db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, 0) ON CONFLICT DO NOTHING",
                [(f"away:{name}",) for name in away],
            )
        return away

    async def rejoined(self) -> list[str]:
        """Configured servers that were away (removed from the config) since last caught up."""
        async with self._read() as db:
            rows = await db.execute_fetchall("SELECT key FROM meta WHERE key LIKE 'away:%'")
        names = {str(r[0]).removeprefix("away:") for r in rows}
        return [n for n in self._policy.servers if n in names]

    async def requeue_differences(self, server: str, wall_ms: int) -> int:
        """Queue for ``server`` every synced register its last-known state differs from the
        canonical one in (it was away, or only sent); return the rows touched."""
        sid = self._sid(server)
        async with self._tx() as db:
            rows = await db.execute_fetchall(
                "SELECT k.user, k.item FROM last_known k JOIN canonical c "
                "ON c.user=k.user AND c.item=k.item WHERE k.server=?",
                (sid,),
            )
            pairs = {(int(r[0]), int(r[1])) for r in rows}
            touched = 0
            if pairs:
                batch = _Batch(self, db)
                await batch.load(pairs)
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
                await batch.flush()
            await db.execute("DELETE FROM meta WHERE key=?", (f"away:{server}",))
        return touched

    async def drop_unmapped_rows(self, peer: str) -> int:
        """Drop rows owed to ``peer`` for items its library index no longer maps (a library
        filter left them out); return how many. Without an index for ``peer``, nothing."""
        async with self._tx() as db:
            sid = self._sid(peer)
            indexed = list(
                await db.execute_fetchall(
                    "SELECT 1 FROM server_items WHERE server=? LIMIT 1", (sid,)
                )
            )
            if not indexed:
                return 0
            cursor = await db.execute(
                "DELETE FROM outbox WHERE peer=? AND NOT EXISTS (SELECT 1 FROM server_items s "
                "WHERE s.server=outbox.peer AND s.item=outbox.item)",
                (sid,),
            )
            count = cursor.rowcount
            await cursor.close()
            if count:
                self._cache.clear()
        return int(count)


class _Batch:
    """The in-memory working set of one transaction: load, apply in order, flush."""

    def __init__(self, ledger: Ledger, db: aiosqlite.Connection, *, cached: bool = True) -> None:
        self.ledger = ledger
        #: Where loads read from and flushes write back to, besides SQLite (None: SQLite only).
        self.cache: _StateCache | None = ledger._cache if cached else None
        self._loaded_pairs: set[_Pair] = set()
        #: Ids this batch gave to rows it creates, and the highest of them.
        self._new_ids: set[int] = set()
        self._highest_id = 0
        self.policy = ledger.policy
        self.db = db
        self.canon: dict[_Pair, CanonicalState] = {}
        self.lk: dict[_Key, UserData] = {}
        self.echo: dict[_Key, tuple[PendingWrite, ...]] = {}
        self.rows: dict[_Key, _Row | None] = {}
        #: Last-seen times this transaction moved (merged into the ledger's at flush).
        self.seen: dict[_Key, int] = {}
        self.members: dict[int, set[int]] = {}
        #: Servers whose library is indexed (they map items), and which loaded items each maps.
        self.indexed: set[int] = set()
        self.mapped: dict[int, set[int]] = {}
        self._loaded_rows: dict[_Key, int] = {}
        self._dirty_canon: set[_Pair] = set()
        self._dirty_lk: set[_Key] = set()
        self._dirty_echo: set[_Key] = set()
        self._dirty_rows: set[_Key] = set()
        self._clock_moved = False
        seed = self.policy.seed
        self._seed_sid = ledger._server_ids.get(seed) if seed is not None else None
        self._configured = {ledger._server_ids[n] for n in self.policy.servers}

    async def load(self, pairs: set[_Pair], *, with_members: bool = True) -> None:
        """Read everything the given (user, item) pairs need: from the cache, else SQLite.

        Pairs this batch already loaded are left as the batch has them (it may have changed
        them). From SQLite it takes a few queries per chunk of pairs.
        """
        wanted = pairs - self._loaded_pairs
        self._loaded_pairs |= wanted
        cache = self.cache
        missing = cache.fill(self, wanted) if cache is not None else wanted
        if missing:
            await self._read_pairs(missing)
            if cache is not None:
                cache.store(self, missing)
        if with_members:
            await self._load_members({u for u, _ in wanted})
            await self._load_mappings({i for _, i in wanted})

    async def _read_pairs(self, pairs: set[_Pair]) -> None:
        for row in await self._by_pairs(_SELECT_CANONICAL, pairs):
            self.canon[(int(row[0]), int(row[1]))] = _canonical(row)
        for row in await self._by_pairs(_SELECT_LAST_KNOWN, pairs):
            self.lk[(int(row[0]), int(row[1]), int(row[2]))] = _state(row, 3)
        for row in await self._by_pairs(_SELECT_ECHO, pairs):
            self.echo[(int(row[0]), int(row[1]), int(row[2]))] = _decode_echo(str(row[3]))
        for row in await self._by_pairs(_SELECT_OUTBOX, pairs, alias="o."):
            key = (int(row[0]), int(row[1]), int(row[2]))
            self.rows[key] = _Row(
                id=int(row[3]),
                mask=_mask_registers(int(row[4])),
                desired=_state(row, 5),
                version=int(row[11]),
                created_ms=int(row[12]),
                attempts=int(row[13]),
                next_attempt_ms=int(row[14]),
                last_error=None if row[15] is None else str(row[15]),
                dead=bool(row[16]),
            )
            self._loaded_rows[key] = int(row[3])

    async def _load_members(self, users: set[int]) -> None:
        """Learn which servers have the given users."""
        cache = self.cache
        missing = set(users)
        if cache is not None:
            for uid in users:
                known = cache.members.get(uid)
                if known is not None:
                    self.members[uid] = set(known)
                    missing.discard(uid)
        for chunk in _chunks(sorted(missing), _CHUNK):
            for uid, sid in await self.db.execute_fetchall(
                f"SELECT user, server FROM server_users WHERE user IN ({_marks(len(chunk))})",  # noqa: S608
                chunk,
            ):
                self.members.setdefault(int(uid), set()).add(int(sid))
        if cache is not None:
            for uid in missing:
                cache.members[uid] = frozenset(self.members.get(uid, ()))

    async def _load_mappings(self, items: set[int]) -> None:
        """Learn which indexed servers map (have) the given items.

        A server whose library is indexed but that does not map an item does not have it: it is
        owed nothing for it until the item appears there (``Ledger.backfill_mapped`` then queues
        it). Servers without an index (identical-id identity) are assumed to have every item.
        """
        cache = self.cache
        indexed = cache.indexed if cache is not None else None
        if indexed is None:
            found: set[int] = set()
            for sid in sorted(self._configured):
                rows = await self.db.execute_fetchall(
                    "SELECT 1 FROM server_items WHERE server=? LIMIT 1", (sid,)
                )
                if list(rows):
                    found.add(sid)
            indexed = frozenset(found)
            if cache is not None:
                cache.indexed = indexed
        self.indexed |= indexed
        if not indexed:
            return
        wanted = set(items)
        if cache is not None:
            for iid in items:
                servers = cache.mapped.get(iid)
                if servers is not None:
                    for sid in servers:
                        self.mapped.setdefault(sid, set()).add(iid)
                    wanted.discard(iid)
        have: dict[int, set[int]] = {}
        for sid in sorted(indexed):
            for chunk in _chunks(sorted(wanted), _CHUNK):
                marks = _marks(len(chunk))
                for (iid,) in await self.db.execute_fetchall(
                    f"SELECT item FROM server_items WHERE server=? AND item IN ({marks})",  # noqa: S608
                    (sid, *chunk),
                ):
                    self.mapped.setdefault(sid, set()).add(int(iid))
                    have.setdefault(int(iid), set()).add(sid)
        if cache is not None:
            if len(cache.mapped) + len(wanted) > cache.limit:
                cache.mapped.clear()  # bounded like the pairs (a library has many items)
            # Most items are mapped by the same servers: one shared set per combination.
            shared: dict[frozenset[int], frozenset[int]] = {}
            for iid in wanted:
                servers = frozenset(have.get(iid, ()))
                cache.mapped[iid] = shared.setdefault(servers, servers)

    def lacks_item(self, server_id: int, item_id: int) -> bool:
        """Tell whether an indexed server does not have the item."""
        return server_id in self.indexed and item_id not in self.mapped.get(server_id, set())

    async def load_one_last_known(self, key: _Key) -> UserData | None:
        """Read one last-known state without loading a whole pair."""
        rows = await self.db.execute_fetchall(
            f"SELECT {_STATE_COLS} FROM last_known "  # noqa: S608 - fixed columns
            "WHERE user=? AND item=? AND server=?",
            key,
        )
        return next((_state(r, 0) for r in rows), None)

    def seen_seq(self, key: _Key) -> int:
        """The ticket of the last thing learnt of ``key`` (0: nothing in this process)."""
        return max(self.seen.get(key, 0), self.ledger._seen.get(key, 0))

    def see(self, key: _Key, seq: int) -> None:
        """Record that ``key`` was seen (an event, a read, a write) at ticket ``seq``."""
        if seq > self.seen_seq(key):
            self.seen[key] = seq

    def apply(self, obs: Observation, key: _Key) -> Applied:
        """Apply one observation to the working set (rules in :meth:`Ledger.apply_observations`)."""
        uid, iid, sid = key
        pending = self.echo.get(key, ())
        if obs.source == "event":
            self.see(key, self.ledger.ticket())
            verdict = classify_event(pending, obs.state, self.lk.get(key), obs.wall_ms)
            if verdict.pending != pending:
                self.echo[key] = pending = verdict.pending
                self._dirty_echo.add(key)
            if verdict.verdict is Verdict.ECHO:
                return Applied(obs, Outcome.ECHO)
            if verdict.verdict is Verdict.AMBIGUOUS:
                return Applied(obs, Outcome.AMBIGUOUS)
        else:
            # A read: never applied over something learnt after it was requested.
            seq = self.ledger.ticket() if obs.read_seq is None else obs.read_seq
            if self.seen_seq(key) > seq:
                return Applied(obs, Outcome.OUTDATED)
            if obs.source != "scan":
                # Scans are bulk (a whole library): they are checked, not remembered. Events,
                # writes and the other reads of the same keys are what they race with.
                self.see(key, seq)
            if obs.source == "scan":
                # A page may show a write recorded after it was requested (an intent whose
                # write landed first): jfsync's own, not the user's. Nothing is consumed.
                verdict = match_echo(
                    pending, obs.state, obs.wall_ms, consume=False, read_at_ms=obs.wall_ms
                )
                if verdict.verdict is Verdict.ECHO:
                    return Applied(obs, Outcome.ECHO)
                if verdict.verdict is Verdict.STALE:
                    return Applied(obs, Outcome.STALE)
            moot = after_read(pending, obs.state, obs.wall_ms, obs.wall_ms)
            if moot != pending:
                self.echo[key] = pending = moot
                self._dirty_echo.add(key)
        previous = self.lk.get(key)
        canonical = self.canon.get((uid, iid))
        policy = self.policy.for_user(obs.user)  # issue 14: the person's register choices
        synced = policy.synced
        if canonical is None and obs.server in policy.receive_only:
            # A receive-only server decides nothing: its state is only remembered.
            self._set_lk(key, obs.state)
            return Applied(obs, Outcome.UNCHANGED)
        if previous is not None and canonical is not None:
            if previous == obs.state:
                return Applied(obs, Outcome.UNCHANGED)
            if all(previous.get(r) == obs.state.get(r) for r in synced):
                self._set_lk(key, obs.state)
                return Applied(obs, Outcome.UNCHANGED)
        stamp = self.policy.stamp(self.tick(obs.wall_ms), obs.server)
        seed_known = self._seed_sid is not None and (uid, iid, self._seed_sid) in self.lk
        result = merge(
            policy,
            canonical=canonical,
            last_known=previous,
            incoming=obs.state,
            stamp=stamp,
            origin=obs.server,
            seed_known=seed_known,
        )
        if result.canonical != canonical:
            self.canon[(uid, iid)] = result.canonical
            self._dirty_canon.add((uid, iid))
        self._set_lk(key, obs.state)
        queued: dict[str, frozenset[Register]] = {}
        targets = (self.members.get(uid, set()) | {sid}) & self._configured
        for target in sorted(targets):
            name = self.ledger._server_names[target]
            owed = result.writes.get(name, frozenset())
            tkey = (uid, iid, target)
            if self.rows.get(tkey) is None and (
                not owed or (target != sid and self.lacks_item(target, iid))
            ):
                continue
            if self.refresh_row(tkey, owed, result.canonical.data, stamp.ms, obs.wall_ms):
                row = self.rows.get(tkey)
                queued[name] = row.mask if row is not None else frozenset()
        return Applied(
            obs,
            Outcome.CHANGED if result.changed else Outcome.UNCHANGED,
            changed=result.changed,
            first_contact=result.first_contact,
            canonical_changed=result.canonical_changed,
            stamp=stamp,
            queued=queued,
        )

    def refresh_row(
        self,
        key: _Key,
        owed: frozenset[Register],
        desired: UserData,
        version: int,
        now_ms: int,
    ) -> bool:
        """Merge ``owed`` into the row of ``key``, prune what the peer holds; tell if it moved."""
        existing = self.rows.get(key)
        mask = set(owed)
        revive = False
        if existing is not None:
            mask |= existing.mask
            revive = existing.dead and bool(owed)
        mask &= self.ledger._synced_of(key[0], key[2])  # issue 14: user choices, send-only
        known = self.lk.get(key)
        if known is not None:
            mask = {r for r in mask if desired.get(r) != known.get(r)}
        if not mask:
            if existing is None:
                return False
            self.rows[key] = None
            self._dirty_rows.add(key)
            return True
        registers = frozenset(mask)
        if (
            existing is not None
            and not revive
            and existing.mask == registers
            and all(existing.desired.get(r) == desired.get(r) for r in registers)
        ):
            return False
        if existing is not None and not revive:
            row = existing.owing(registers, desired, version)
        elif existing is not None:
            row = _Row(existing.id, registers, desired, version, existing.created_ms)
        else:
            row = _Row(self._loaded_rows.get(key), registers, desired, version, now_ms)
        self.rows[key] = row
        self._dirty_rows.add(key)
        return True

    async def flush(self) -> None:
        """Write every changed canonical state, last-known state, echo list and row."""
        db = self.db
        if self._dirty_canon:
            await db.executemany(
                _UPSERT_CANONICAL,
                [(*pair, *_canonical_values(self.canon[pair])) for pair in self._dirty_canon],
            )
        if self._dirty_lk:
            await db.executemany(
                _UPSERT_LAST_KNOWN,
                [(*key, *_state_values(self.lk[key])) for key in self._dirty_lk],
            )
        if self._dirty_echo:
            keep = [k for k in self._dirty_echo if self.echo[k]]
            drop = [k for k in self._dirty_echo if not self.echo[k]]
            if keep:
                await db.executemany(
                    _UPSERT_ECHO,
                    [(*k, _encode_echo(self.echo[k])) for k in keep],
                )
            if drop:
                await db.executemany(
                    "DELETE FROM pending_echo WHERE user=? AND item=? AND server=?", drop
                )
        if self._dirty_rows:
            await self._flush_rows()
        if self._clock_moved:
            await db.execute(
                "UPDATE meta SET value=? WHERE key='clock_ms'", (self.ledger.clock_ms,)
            )
        if self.cache is not None:
            self.cache.absorb(self)
        if self.seen:
            self.ledger._note_seen(self.seen)

    async def _flush_rows(self) -> None:
        await self.number_new_rows()
        deletes: list[tuple[int]] = []
        updates: list[tuple[Any, ...]] = []
        inserts: list[tuple[Any, ...]] = []
        for key in self._dirty_rows:
            row = self.rows[key]
            if row is None:
                if key in self._loaded_rows:
                    deletes.append((self._loaded_rows[key],))
                continue
            values = (
                _mask_bits(row.mask),
                *_state_values(row.desired),
                row.version,
                row.created_ms,
                row.attempts,
                row.next_attempt_ms,
                row.last_error,
                int(row.dead),
            )
            if row.id in self._new_ids:
                inserts.append((row.id, key[2], key[0], key[1], *values))
            else:
                updates.append((*values, row.id))
        if deletes:
            await self.db.executemany("DELETE FROM outbox WHERE id=?", deletes)
        if updates:
            await self.db.executemany(
                f"UPDATE outbox SET registers=?, {', '.join(c + '=?' for c in _STATE_COLS.split(', '))}, "  # noqa: S608, E501
                "version=?, created_ms=?, attempts=?, next_attempt_ms=?, last_error=?, dead=? "
                "WHERE id=?",
                updates,
            )
        if inserts:
            await self.db.executemany(
                f"INSERT INTO outbox(id, peer, user, item, registers, {_STATE_COLS}, version, "  # noqa: S608
                "created_ms, attempts, next_attempt_ms, last_error, dead) "
                f"VALUES ({_marks(17)})",
                inserts,
            )

    def record_intents(
        self, key: _Key, base: UserData, states: Sequence[UserData], wall_ms: int
    ) -> None:
        """Add ``states`` as pending echoes of ``key`` replacing ``base`` (writes ahead)."""
        pending = self.echo.get(key, ())
        for state in states:
            pending = record_write(pending, state, wall_ms, base)
        self.echo[key] = pending
        self._dirty_echo.add(key)

    async def number_new_rows(self) -> None:
        """Give the rows created so far their ids (flush numbers the rest).

        Numbered inside the write transaction (no other writer can take a number), so the
        batch and the cache know every row's id without reading it back after the insert.
        """
        new = [k for k in self._dirty_rows if (row := self.rows[k]) is not None and row.id is None]
        if not new:
            return
        rows = await self.db.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM outbox")
        first = max(int(next(iter(rows))[0]), self._highest_id) + 1
        for offset, key in enumerate(sorted(new)):
            row = self.rows[key]
            assert row is not None
            self.rows[key] = row.numbered(first + offset)
            self._new_ids.add(first + offset)
        self._highest_id = first + len(new) - 1

    def outbox_row(self, key: _Key, like: OutboxRow) -> OutboxRow | None:
        """The row of ``key`` as it stands in this batch, named like ``like`` (or None)."""
        row = self.rows.get(key)
        if row is None:
            return None
        assert row.id is not None  # number_new_rows first
        return OutboxRow(
            id=row.id,
            peer=like.peer,
            user=like.user,
            item=like.item,
            registers=row.mask,
            desired=row.desired,
            version=row.version,
            created_ms=row.created_ms,
            attempts=row.attempts,
            next_attempt_ms=row.next_attempt_ms,
            last_error=row.last_error,
            dead=row.dead,
            remote_user_id=like.remote_user_id,
            remote_item_id=like.remote_item_id,
        )

    def written(self, key: _Key, version: int, state: UserData, wall_ms: int) -> bool:
        """Record a write of ``state`` to the peer of ``key``; drop the row if still ``version``."""
        replaced = self.lk.get(key)
        self._set_lk(key, state)
        self.see(key, self.ledger.ticket())
        # An intent recorded before the write (record_intents) is replaced by this entry: one
        # entry per echo, timed when the write completed (scans compare against that).
        pending = tuple(p for p in self.echo.get(key, ()) if p.state != state)
        self.echo[key] = record_write(pending, state, wall_ms, replaced)
        self._dirty_echo.add(key)
        done = self._settle_row(key, version, state)
        # A change that came while the write was on its way may have moved the canonical
        # value back to what the peer held before it: its row was pruned then (nothing owed
        # to a peer already holding it), and the write has just undone that. Owe it again.
        canonical = self.canon.get(key[:2])
        if canonical is not None:
            owed = frozenset(r for r in self.policy.synced if state.get(r) != canonical.data.get(r))
            if owed:
                self.refresh_row(key, owed, canonical.data, self.tick(wall_ms), wall_ms)
        return done

    def _settle_row(self, key: _Key, version: int, state: UserData) -> bool:
        """Drop the row of ``key`` if still ``version``, else what ``state`` delivered of it."""
        row = self.rows.get(key)
        if row is None:
            return False
        if row.version == version:
            self.rows[key] = None
            self._dirty_rows.add(key)
            return True
        # Replaced mid-flight: keep what the write did not already deliver (same version, so
        # a pusher holding the newer row can still ack it).
        left = frozenset(r for r in row.mask if row.desired.get(r) != state.get(r))
        if not left:
            self.rows[key] = None
            self._dirty_rows.add(key)
        elif left != row.mask:
            self.rows[key] = replace(row, mask=left)
            self._dirty_rows.add(key)
        return False

    def _set_lk(self, key: _Key, state: UserData) -> None:
        self.lk[key] = state
        self._dirty_lk.add(key)

    def tick(self, wall_ms: int) -> int:
        """Advance the hybrid clock and persist it with this batch."""
        self._clock_moved = True
        return self.ledger._tick(wall_ms)

    async def _by_pairs(self, select: str, pairs: set[_Pair], alias: str = "") -> list[Any]:
        by_user: dict[int, list[int]] = defaultdict(list)
        for uid, iid in pairs:
            by_user[uid].append(iid)
        found: list[Any] = []
        for uid, items in by_user.items():
            for chunk in _chunks(sorted(items), _CHUNK):
                found.extend(
                    await self.db.execute_fetchall(
                        f"{select} WHERE {alias}user=? AND {alias}item IN ({_marks(len(chunk))})",
                        (uid, *chunk),
                    )
                )
        return found


# ---------------------------------------------------------------------- encoding helpers


def _decode_row(r: Sequence[Any], names: dict[int, str]) -> OutboxRow:
    return OutboxRow(
        id=int(r[0]),
        peer=names[int(r[1])],
        user=str(r[2]),
        item=str(r[3]),
        registers=_mask_registers(int(r[4])),
        desired=_state(r, 5),
        version=int(r[11]),
        created_ms=int(r[12]),
        attempts=int(r[13]),
        next_attempt_ms=int(r[14]),
        last_error=None if r[15] is None else str(r[15]),
        dead=bool(r[16]),
        remote_user_id=None if r[17] is None else str(r[17]),
        remote_item_id=None if r[18] is None else str(r[18]),
    )


def _state_values(data: UserData) -> tuple[Any, ...]:
    ps = data.play_state
    return (
        int(data.favorite),
        data.rating,
        int(ps.played),
        ps.play_count,
        ps.last_played_s,
        ps.position_ticks,
    )


def _state(row: Sequence[Any], offset: int) -> UserData:
    rating = row[offset + 1]
    last = row[offset + 4]
    # Interned: rows repeat a few states (a season marked played, the defaults).
    return user_data(
        bool(row[offset]),
        None if rating is None else float(rating),
        bool(row[offset + 2]),
        int(row[offset + 3]),
        None if last is None else int(last),
        int(row[offset + 5]),
    )


def _canonical(row: Sequence[Any]) -> CanonicalState:
    data = _state(row, 2)

    def stamped(offset: int) -> Stamped:
        return Stamped(Stamp(int(row[offset]), int(row[offset + 1])), str(row[offset + 2]))

    return CanonicalState(data, stamped(8), stamped(11), stamped(14))


def _canonical_values(state: CanonicalState) -> tuple[Any, ...]:
    values: list[Any] = list(_state_values(state.data))
    for stamped in (state.favorite, state.rating, state.play_state):
        values.extend((stamped.stamp.ms, stamped.stamp.tiebreak, stamped.origin))
    return tuple(values)


def _encode_echo(entries: Sequence[PendingWrite]) -> str:
    # The JSON of [[written_ms, state, replaced], ...]; states are interned and few, so each
    # one's text is made once (two encodes per write otherwise: intent and ack).
    return (
        "["
        + ",".join(
            f"[{e.written_ms},{_state_json(e.state)},"
            f"{'null' if e.replaced is None else _state_json(e.replaced)}]"
            for e in entries
        )
        + "]"
    )


@functools.lru_cache(maxsize=4096)
def _state_json(state: UserData) -> str:
    return json.dumps(_state_values(state), separators=(",", ":"))


def _decode_echo(text: str) -> tuple[PendingWrite, ...]:
    return tuple(
        PendingWrite(_state(e[1], 0), int(e[0]), None if e[2] is None else _state(e[2], 0))
        for e in json.loads(text)
    )


def _mask_bits(registers: Iterable[Register]) -> int:
    bits = 0
    for register in registers:
        bits |= _BITS[register]
    return bits


def _mask_registers(bits: int) -> frozenset[Register]:
    return _MASKS[bits & _ALL_BITS]


_ALL_BITS = sum(_BITS.values())
#: Every register set, by its bits (decoded once, shared by every row).
_MASKS = tuple(frozenset(r for r, b in _BITS.items() if bits & b) for bits in range(_ALL_BITS + 1))


def _ordered(registers: Iterable[Register]) -> list[Register]:
    wanted = set(registers)
    return [r for r in ALL_REGISTERS if r in wanted]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
