"""The ledger's schema as ordered migrations keyed on ``PRAGMA user_version``, and connection setup.

:func:`connect` opens an aiosqlite connection whose worker thread can never keep the process
alive at exit; :func:`run_on_thread` runs one plain function on that thread (one hop) and
:func:`write_transaction` is the body of a write transaction run that way (BEGIN IMMEDIATE, the
work, COMMIT, or ROLLBACK on any failure); :func:`settle` cleans up after a failed or cancelled
transaction run statement by statement and :class:`WriteGate` runs such transactions;
:func:`prepare` switches a fresh connection to WAL mode with foreign keys on, then
:func:`migrate` applies, in order and each in its own transaction, every migration whose version
is above the database's ``user_version``, setting ``user_version`` in the same transaction. A
database written by a newer jfsync (a higher ``user_version`` than :data:`LATEST_VERSION`) is
refused rather than guessed at. Never edit a released migration: append a new one.

Schema v1 (see :data:`MIGRATIONS`): ``meta`` (the hybrid clock), ``servers``, canonical
``users`` and ``items``, the per-server id maps ``server_users`` and ``server_items`` (with the
type, path and provider ids later identity matching needs), ``canonical`` (value, stamp and
origin per register), ``last_known`` (each server's state of each user and item),
``pending_echo``, ``outbox`` (one row per peer, user and item) and ``tokens``.

Schema v2 adds the library index of :mod:`jfsync.sync.index`: ``index_items`` (every server's leaf
items with type, name, year, path, provider ids, series, season and episode numbers),
``index_series`` (series provider ids), ``index_keys`` (provider-id match keys) and
``index_scans`` (scan generations).

The reset-guard migration adds ``reset_holds``: one row per (server, user) whose data the
server showed wiped while ``sync.reset_guard`` is ``hold`` (:mod:`jfsync.sync.resetguard`), with
the operator's decision once ``jfsync accept-reset`` made one. Each server's Jellyfin id lives
in ``servers.jellyfin_id`` (there since v1).

Schema v4 drops those four tables again: the library index lives in a file of its own beside
the ledger (``<ledger>.index``, :mod:`jfsync.sync.index`), which a scan of each server rebuilds.
The pages they held stay in the file as free pages that the ledger reuses as it grows.

Schema v5 drops the index ``outbox_by_pair`` (outbox rows by user and item): every outbox row
written or deleted paid for it, and a transaction loads a pair's rows as fast through the
``UNIQUE (peer, user, item)`` index, one look-up per server (:mod:`jfsync.sync.ledger.writer`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiosqlite

from jfsync.errors import JfsyncError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SchemaVersionError(JfsyncError):
    """The ledger file was written by a newer jfsync, or is not a ledger at all."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: the version it produces and the statements that get there."""

    version: int
    description: str
    statements: tuple[str, ...]


_V1 = Migration(
    version=1,
    description="ledger: servers, users, items, id maps, canonical, last-known, echo, outbox",
    statements=(
        """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE servers (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            jellyfin_id TEXT
        )""",
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE
        )""",
        """CREATE TABLE items (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE
        )""",
        """CREATE TABLE server_users (
            server INTEGER NOT NULL REFERENCES servers(id),
            remote_id TEXT NOT NULL,
            user INTEGER NOT NULL REFERENCES users(id),
            name TEXT,
            PRIMARY KEY (server, remote_id),
            UNIQUE (server, user)
        ) WITHOUT ROWID""",
        "CREATE INDEX server_users_by_user ON server_users(user, server)",
        """CREATE TABLE server_items (
            server INTEGER NOT NULL REFERENCES servers(id),
            remote_id TEXT NOT NULL,
            item INTEGER NOT NULL REFERENCES items(id),
            item_type TEXT,
            path TEXT,
            provider_ids TEXT,
            PRIMARY KEY (server, remote_id),
            UNIQUE (server, item)
        ) WITHOUT ROWID""",
        "CREATE INDEX server_items_by_path ON server_items(server, path)",
        """CREATE TABLE canonical (
            user INTEGER NOT NULL REFERENCES users(id),
            item INTEGER NOT NULL REFERENCES items(id),
            favorite INTEGER NOT NULL,
            rating REAL,
            played INTEGER NOT NULL,
            play_count INTEGER NOT NULL,
            last_played_s INTEGER,
            position_ticks INTEGER NOT NULL,
            favorite_ms INTEGER NOT NULL,
            favorite_tiebreak INTEGER NOT NULL,
            favorite_origin TEXT NOT NULL,
            rating_ms INTEGER NOT NULL,
            rating_tiebreak INTEGER NOT NULL,
            rating_origin TEXT NOT NULL,
            play_state_ms INTEGER NOT NULL,
            play_state_tiebreak INTEGER NOT NULL,
            play_state_origin TEXT NOT NULL,
            PRIMARY KEY (user, item)
        ) WITHOUT ROWID""",
        """CREATE TABLE last_known (
            user INTEGER NOT NULL REFERENCES users(id),
            item INTEGER NOT NULL REFERENCES items(id),
            server INTEGER NOT NULL REFERENCES servers(id),
            favorite INTEGER NOT NULL,
            rating REAL,
            played INTEGER NOT NULL,
            play_count INTEGER NOT NULL,
            last_played_s INTEGER,
            position_ticks INTEGER NOT NULL,
            PRIMARY KEY (user, item, server)
        ) WITHOUT ROWID""",
        "CREATE INDEX last_known_by_server ON last_known(server, user)",
        """CREATE TABLE pending_echo (
            user INTEGER NOT NULL REFERENCES users(id),
            item INTEGER NOT NULL REFERENCES items(id),
            server INTEGER NOT NULL REFERENCES servers(id),
            entries TEXT NOT NULL,
            PRIMARY KEY (user, item, server)
        ) WITHOUT ROWID""",
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            peer INTEGER NOT NULL REFERENCES servers(id),
            user INTEGER NOT NULL REFERENCES users(id),
            item INTEGER NOT NULL REFERENCES items(id),
            registers INTEGER NOT NULL,
            favorite INTEGER NOT NULL,
            rating REAL,
            played INTEGER NOT NULL,
            play_count INTEGER NOT NULL,
            last_played_s INTEGER,
            position_ticks INTEGER NOT NULL,
            version INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_ms INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            dead INTEGER NOT NULL DEFAULT 0,
            UNIQUE (peer, user, item)
        )""",
        "CREATE INDEX outbox_due ON outbox(peer, dead, next_attempt_ms, created_ms)",
        "CREATE INDEX outbox_by_pair ON outbox(user, item)",
        """CREATE TABLE tokens (
            server TEXT NOT NULL,
            user TEXT NOT NULL,
            token TEXT NOT NULL,
            PRIMARY KEY (server, user)
        ) WITHOUT ROWID""",
    ),
)

_V2 = Migration(
    version=2,
    description="library index: every server's leaf items, their series and match keys",
    statements=(
        # One row per leaf item a server has (jfsync.sync.index). ``id`` is a local handle used by
        # the matcher; ``match_path`` is the path after the server's prefix rewrites.
        """CREATE TABLE index_items (
            id INTEGER PRIMARY KEY,
            server INTEGER NOT NULL REFERENCES servers(id),
            remote_id TEXT NOT NULL,
            item_type TEXT NOT NULL,
            name TEXT,
            year INTEGER,
            path TEXT,
            match_path TEXT,
            provider_ids TEXT,
            series_id TEXT,
            season INTEGER,
            episode INTEGER,
            scan INTEGER NOT NULL,
            UNIQUE (server, remote_id)
        )""",
        "CREATE INDEX index_items_by_path ON index_items(match_path, server)",
        """CREATE TABLE index_series (
            server INTEGER NOT NULL REFERENCES servers(id),
            remote_id TEXT NOT NULL,
            name TEXT,
            provider_ids TEXT,
            scan INTEGER NOT NULL,
            PRIMARY KEY (server, remote_id)
        ) WITHOUT ROWID""",
        # Provider-id match keys ("Movie|imdb|tt0133093", "Episode|tvdb|81189|1|2"), several
        # per item.
        """CREATE TABLE index_keys (
            server INTEGER NOT NULL,
            key TEXT NOT NULL,
            entry INTEGER NOT NULL REFERENCES index_items(id) ON DELETE CASCADE,
            PRIMARY KEY (server, key, entry)
        ) WITHOUT ROWID""",
        "CREATE INDEX index_keys_by_entry ON index_keys(entry)",
        # Per server: the current scan generation and when the last complete scan ended.
        """CREATE TABLE index_scans (
            server INTEGER PRIMARY KEY REFERENCES servers(id),
            scan INTEGER NOT NULL,
            complete_ms INTEGER,
            rewrites TEXT
        )""",
    ),
)

_RESET_HOLDS = Migration(
    version=3,
    description="reset guard: (server, user) pairs held after the server lost their data",
    statements=(
        # ``resolution``: NULL while held; 'accept' or 'restore' once the operator decided
        # (applied, and the row deleted, by the next catch-up of that user on that server).
        """CREATE TABLE reset_holds (
            server INTEGER NOT NULL REFERENCES servers(id),
            user INTEGER NOT NULL REFERENCES users(id),
            items INTEGER NOT NULL,
            known INTEGER NOT NULL,
            since_ms INTEGER NOT NULL,
            resolution TEXT,
            PRIMARY KEY (server, user)
        ) WITHOUT ROWID""",
    ),
)

_INDEX_FILE = Migration(
    version=4,
    description="library index moved to a file of its own (<ledger>.index): its tables leave",
    statements=(
        # The index is derived data (a scan of each server rebuilds it): it now lives in its
        # own file (jfsync.sync.index), built without a journal and marked complete at the end.
        # The id maps (server_items) stay here, so the matching of every item is unchanged; on
        # the first start after the upgrade the new file is filled by the usual start-up scan.
        # Children first: index_keys referenced index_items.
        "DROP TABLE IF EXISTS index_keys",
        "DROP TABLE IF EXISTS index_items",
        "DROP TABLE IF EXISTS index_series",
        "DROP TABLE IF EXISTS index_scans",
    ),
)

_OUTBOX_BY_PEER = Migration(
    version=5,
    description="outbox rows of a pair found through (peer, user, item): outbox_by_pair goes",
    statements=(
        # A bulk apply inserts (and its acks delete) one outbox row per write: the second
        # index by (user, item) was a quarter of that work. Loads read a pair's rows through
        # the unique (peer, user, item) index instead, one look-up per server. Nothing
        # deletes users or items (ids are never reused), so no foreign-key check needs it.
        "DROP INDEX IF EXISTS outbox_by_pair",
    ),
)

#: Every migration, in order. Versions are 1, 2, 3, ... without gaps.
MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _RESET_HOLDS, _INDEX_FILE, _OUTBOX_BY_PEER)

#: The schema version this jfsync writes.
LATEST_VERSION = MIGRATIONS[-1].version


async def connect(path: str) -> aiosqlite.Connection:
    """Open ``path`` in autocommit mode on a daemon worker thread.

    aiosqlite's worker thread is not a daemon: a connection left open by a failure (a task
    that died, a shutdown cut short) would keep the process alive forever at exit, which for
    a service under docker or systemd means a stop that never ends. Committed data needs no
    thread to survive (WAL), so nothing is lost by not waiting for it.
    """
    pending = aiosqlite.connect(path, isolation_level=None)
    worker = getattr(pending, "_thread", None)
    if worker is not None:
        worker.daemon = True
    return await pending


async def run_on_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn(conn)`` on ``db``'s own thread, with its ``sqlite3.Connection``: ONE hop.

    aiosqlite 0.22 has no public way to run a callable on its worker thread; this is the one
    place that uses its private ``Connection._execute(fn, *args)`` (queue a call on the thread,
    in order with every other call) and ``Connection._conn`` (the sqlite3 connection).
    ``tests/core/test_ledger_thread.py`` fails should an aiosqlite upgrade change either.

    The call always runs to its end on the thread: a caller cancelled meanwhile still waits
    for it to end (cancelled again, it keeps waiting) and only then gets CancelledError. So
    when this returns or raises, nothing of ``fn`` runs any more: what it touches in Python is
    never shared with the caller's next step, and the next call starts on an idle connection.
    ``fn`` must therefore be bounded (one transaction) and must leave the connection idle on
    failure (:func:`write_transaction` does).
    """
    conn: sqlite3.Connection = db._conn
    execute: Callable[..., Any] = db._execute
    call = _Call(fn, asyncio.get_running_loop())
    try:
        # Awaited directly (no task of its own): queued on the thread before the first wait.
        result: T = await execute(call.run, conn)
    except asyncio.CancelledError:
        pass  # the call is queued or running still: wait below for its end
    else:
        return result
    ended = call.wait_for_end()
    while ended is not None and not ended.done():
        try:
            await asyncio.wait((ended,))
        except asyncio.CancelledError:
            continue  # cancelled again: the call still runs, so still wait
    raise asyncio.CancelledError


class _Call:
    """One call of :func:`run_on_thread`, and how a cancelled caller learns that it ended.

    The thread runs :meth:`run`; a caller cancelled before the result came asks
    :meth:`wait_for_end` for a future that the thread resolves once the call ended (None when
    it has already). On the usual path nothing but one flag under a lock is added.
    """

    __slots__ = ("_ended", "_fn", "_lock", "_loop", "_waiter")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._fn = fn
        self._loop = loop
        self._lock = threading.Lock()
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None

    def run(self, conn: sqlite3.Connection) -> Any:
        """On the connection's thread: the call itself, then tell a waiting caller."""
        try:
            return self._fn(conn)
        finally:
            with self._lock:
                self._ended = True
                waiter = self._waiter
            if waiter is not None:
                self._loop.call_soon_threadsafe(_resolve, waiter)

    def wait_for_end(self) -> asyncio.Future[None] | None:
        """On the event loop: a future resolved once the call ended, or None if it has."""
        with self._lock:
            if self._ended:
                return None
            self._waiter = self._loop.create_future()
            return self._waiter


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def sqlite_uri(path: str, query: str = "") -> str:
    """An SQLite ``file:`` URI of ``path`` (any character of the path kept as it is, the path
    made absolute) with ``query`` (``mode=ro``, ...)."""
    return f"file:{quote(os.path.abspath(path))}" + (f"?{query}" if query else "")


def write_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``work`` in one write transaction on ``conn`` (autocommit mode), on its thread.

    BEGIN IMMEDIATE, ``work(conn)``, COMMIT; on any failure (of the work or of the COMMIT) the
    transaction is rolled back before the error goes on, so the connection is idle again
    either way. Meant to be the function :func:`run_on_thread` runs.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as err:
                logger.debug("rollback after a failed transaction failed: %s", err)
        raise
    return result


async def settle(db: aiosqlite.Connection) -> None:
    """Roll back what a failed or cancelled transaction left open on ``db``.

    A call whose caller was cancelled still runs on the connection's thread (a BEGIN, a
    write): this waits until everything queued before has run (calls run in order), then
    rolls back any open transaction, so the next transaction starts on an idle connection.
    Shielded, as a stop may cancel the caller while it runs (then CancelledError is raised
    and the caller should settle again before its next transaction). Errors of a broken or
    closed connection are left for the next call to report.
    """
    try:
        await asyncio.shield(db.execute_fetchall("SELECT 1"))
        if db.in_transaction:
            await asyncio.shield(db.rollback())
    except (sqlite3.Error, ValueError) as err:
        logger.debug("rollback after a failed transaction failed: %s", err)


class WriteGate:
    """Serialises the use of one connection and runs its write transactions statement by
    statement (the library index does; the ledger holds only :attr:`lock` and runs each
    transaction as one call, :func:`run_on_thread` with :func:`write_transaction`).

    ``lock`` is held for every use of the connection (reads too); :meth:`transaction` runs
    BEGIN IMMEDIATE ... COMMIT under it, calls ``on_commit`` once COMMIT returned (still under
    the lock) and, when the body or the COMMIT fails or is cancelled, calls ``on_failure`` and
    settles the connection (:func:`settle`). A settle cut short by another cancellation is
    done first by the next transaction.
    """

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self._unsettled = False

    @asynccontextmanager
    async def transaction(
        self,
        db: aiosqlite.Connection,
        on_failure: Callable[[], None] | None = None,
        *,
        on_commit: Callable[[], None] | None = None,
    ) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction on ``db``, under :attr:`lock`."""
        async with self.lock:
            if self._unsettled:
                await settle(db)
                self._unsettled = False
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.commit()
            except BaseException:
                if on_failure is not None:
                    on_failure()
                self._unsettled = True
                await settle(db)
                self._unsettled = False
                raise
            if on_commit is not None:
                on_commit()


async def prepare(db: aiosqlite.Connection) -> None:
    """Set the connection up: WAL journal, foreign keys, a busy timeout, NORMAL sync.

    NORMAL synchronous in WAL mode never loses a committed transaction to a process crash; a
    power cut may roll the last commits back, atomically, which re-observation repairs.
    """
    cursor = await db.execute("PRAGMA journal_mode=WAL")
    row = await cursor.fetchone()
    await cursor.close()
    if row is None or str(row[0]).lower() != "wal":
        raise SchemaVersionError(f"the ledger cannot use WAL mode (journal_mode={row})")
    await db.execute("PRAGMA foreign_keys=ON")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.execute("PRAGMA busy_timeout=5000")


async def schema_version(db: aiosqlite.Connection) -> int:
    """Return the database's ``PRAGMA user_version``."""
    cursor = await db.execute("PRAGMA user_version")
    row = await cursor.fetchone()
    await cursor.close()
    return int(row[0]) if row is not None else 0


async def migrate(
    db: aiosqlite.Connection, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[int]:
    """Apply the migrations above the current version, each in one transaction.

    Returns the versions applied (empty when the schema was already current). The connection
    must be in autocommit mode (``isolation_level=None``).
    """
    _check_sequence(migrations)
    current = await schema_version(db)
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise SchemaVersionError(
            f"the ledger has schema version {current} but this jfsync knows only up to "
            f"{latest}; run a newer jfsync or point ledger: at another file"
        )
    applied: list[int] = []
    for migration in migrations:
        if migration.version <= current:
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in migration.statements:
                await db.execute(statement)
            # user_version lives in the database header and commits with the transaction.
            await db.execute(f"PRAGMA user_version = {int(migration.version)}")
        except BaseException:
            await db.rollback()
            raise
        await db.commit()
        applied.append(migration.version)
    return applied


def _check_sequence(migrations: tuple[Migration, ...]) -> None:
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(
                f"migration versions must be 1, 2, 3, ...; found {migration.version} at "
                f"position {expected}"
            )
