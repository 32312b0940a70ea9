"""The library index: every server's leaf items, in a file of its own, and the match queries.

:class:`LibraryIndex` stores, per configured server, each leaf item (movie, episode, video,
audio...) with what cross-server matching needs: id, type, name, year, path (as reported and
after the server's ``path_rewrites``), provider ids, series id with season and episode numbers,
plus the provider ids of every series (``index_series``) and the derived provider-id match keys
(``index_keys``).

The index is derived data (a scan of each server rebuilds it), so it lives beside the ledger in
a file of its own, ``<ledger>.index`` (:func:`index_path`), with the ledger attached read-only
for the queries that join the id maps: an index transaction never takes the ledger's write
lock. A new file is built in bulk: its tables are filled in insertion order without their
secondary indexes and without a journal (``journal_mode=MEMORY``, ``synchronous=OFF``), so
every page is written about once; once no first scan is running any more, the indexes are made
in one sorted pass, the file is synced, switched to WAL and only then marked complete
(``index_meta``). A file without that mark (a build cut short by a crash or a stop), of another
layout, or whose servers are not the ledger's, is deleted at :meth:`LibraryIndex.open` and
built again: an unfinished index is never used. Queries that need the indexes wait for the
bulk build to end (:meth:`LibraryIndex.ready`); a server whose first scan comes later (added to
the config, or down during the build) is scanned into the indexed tables.

It is filled by paged ``GET /Items`` scans with the admin API key and no ``userId``
(``Fields=Path,ProviderIds``): a series listing first, then the leaf items. Pages are stored in
short transactions (the first page alone, then more while they stay quick, up to
:data:`TX_PAGES`) on a connection of the index's own (WAL once built: the lookups' connection
reads meanwhile), so a rescan of 100,000 items never holds a lock for long and the event loop
runs between pages. Only rows that are new or changed are written: a rescan of a library that
did not change writes next to nothing. A complete scan then drops the rows it did not see
(removed items) and reports, in its :class:`ScanResult`, the entries it changed and what they
were linked to, so that only those are matched again. :meth:`LibraryIndex.refresh_items`
re-reads only some ids (``LibraryChanged``).

A live event's id map (at most :data:`QUICK_LOOKUP` ids) is read on the event loop through a
read-only connection to the ledger file (:class:`_QuickReader`: WAL, so it never waits for the
writer, and it sees every committed transaction); larger lookups, and any the reader cannot
answer at once, go to the lookup connection's thread.

The matcher in :mod:`jfsync.sync.identity` reads candidate pairs through :meth:`LibraryIndex.edges`
(identical id, rewritten path, shared provider-id key) and streams the resulting groups back
through :meth:`LibraryIndex.group_rows`; to match again after a change it follows the links of
the changed entries (:meth:`LibraryIndex.closure`) and reads only those (``scoped_*``). Open
the :class:`jfsync.sync.ledger.store.Ledger` first: it creates and migrates the ledger; the
index only checks its version.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import aiosqlite

from jfsync.config import PathRewrite, ServerConfig
from jfsync.errors import JfsyncError
from jfsync.heap import KeySet
from jfsync.jellyfin.api import DEFAULT_ITEM_TYPES, JellyfinClient
from jfsync.jellyfin.wire import BaseItemDto
from jfsync.sync.filters import LibraryScope, resolve_scope
from jfsync.sync.ledger.schema import WriteGate, run_on_thread, sqlite_uri

logger = logging.getLogger(__name__)

#: Provider ids that name one work (not a collection, album or artist shared by many items).
IDENTIFYING_PROVIDERS: frozenset[str] = frozenset(
    {
        "imdb",
        "tmdb",
        "tvdb",
        "tvmaze",
        "tvrage",
        "zap2it",
        "anidb",
        "musicbrainztrack",
        "musicbrainzrecording",
    }
)
#: The ledger schema from which the index lives in a file of its own (the ledger's copy of
#: the index tables is dropped by that migration).
INDEX_SCHEMA_VERSION = 4
#: The index file is the ledger's path with this suffix.
INDEX_SUFFIX = ".index"
#: The layout of the index file (its ``PRAGMA user_version``); a file of another layout is
#: built again.
INDEX_FILE_VERSION = 1
#: Items per page of a scan.
PAGE_SIZE = 1000
#: Rows per IN (...) list.
_CHUNK = 500
#: Page cache of the scanning connection, in KiB.
BULK_CACHE_KIB = 16384
#: Most pages stored per transaction. Every transaction rewrites the pages of the index's
#: b-trees it touches (remote ids and match keys land all over them), so fewer, larger ones
#: write much less; but each holds the ledger's write lock while it runs.
TX_PAGES = 5
#: A scan stores one more page per transaction while they take less than this (seconds)...
TX_GROW_S = 0.2
#: ...and one fewer once one takes more than this: the write lock is never held for long.
TX_SHRINK_S = 0.4
#: A scan that changed more entries than this does not list them (everything is matched again).
DIRTY_LIMIT = 20_000

#: The index file's tables, made when the file is created. ``index_keys`` is clustered by entry,
#: so a build appends to it; ``index_servers`` names the ledger's server ids the rows use.
_FILE_TABLES = (
    "CREATE TABLE index_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE index_servers (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    """CREATE TABLE index_items (
        id INTEGER PRIMARY KEY,
        server INTEGER NOT NULL,
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
        scan INTEGER NOT NULL
    )""",
    """CREATE TABLE index_series (
        server INTEGER NOT NULL,
        remote_id TEXT NOT NULL,
        name TEXT,
        provider_ids TEXT,
        scan INTEGER NOT NULL,
        PRIMARY KEY (server, remote_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE index_keys (
        entry INTEGER NOT NULL,
        server INTEGER NOT NULL,
        key TEXT NOT NULL,
        PRIMARY KEY (entry, server, key)
    ) WITHOUT ROWID""",
    """CREATE TABLE index_scans (
        server INTEGER PRIMARY KEY,
        scan INTEGER NOT NULL,
        complete_ms INTEGER,
        rewrites TEXT
    )""",
)
#: The secondary indexes, made in one sorted pass once the bulk build ended. A scan lists each
#: item once (``JellyfinClient.iter_items`` skips repeats) and a bulk scan starts from no rows
#: of its server, so the unique ones hold.
_FILE_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS index_items_by_remote ON index_items(server, remote_id)",
    "CREATE INDEX IF NOT EXISTS index_items_by_path ON index_items(match_path, server)",
    "CREATE UNIQUE INDEX IF NOT EXISTS index_keys_by_key ON index_keys(server, key, entry)",
)
#: ``index_meta`` state of a file whose build completed (see the module docstring).
_READY = "ready"

#: Scratch tables of the matcher (per connection, never in the ledger file).
_TEMP_TABLES = (
    "CREATE TEMP TABLE IF NOT EXISTS match_groups (entry INTEGER PRIMARY KEY, grp INTEGER)",
    # Clustered by group (filled in that order: every page written once); the items mapped
    # are indexed apart, only those (a first match maps none).
    "CREATE TEMP TABLE IF NOT EXISTS group_members (grp INTEGER NOT NULL, entry INTEGER NOT NULL, "
    "refused INTEGER NOT NULL, item INTEGER, PRIMARY KEY (grp, entry)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS temp.group_members_by_item ON group_members(item) "
    "WHERE item IS NOT NULL",
    "CREATE TEMP TABLE IF NOT EXISTS dirty_groups (grp INTEGER PRIMARY KEY)",
    "CREATE TEMP TABLE IF NOT EXISTS match_scope (entry INTEGER PRIMARY KEY)",
    # Keyed by the order groups are streamed in (see LibraryIndex.group_rows): read in that
    # order through its own b-tree, so streaming needs no sort of the members' rows.
    "CREATE TEMP TABLE IF NOT EXISTS group_order (sort TEXT PRIMARY KEY, grp INTEGER NOT NULL) "
    "WITHOUT ROWID",
)

Rule = Literal["id", "path", "provider"]
#: Matching rules in the order they are tried.
RULES: tuple[Rule, ...] = ("id", "path", "provider")

_EDGE_SQL: dict[Rule, str] = {
    "id": (
        "SELECT a.id, b.id FROM index_items a JOIN index_items b "
        "ON b.server = ? AND b.remote_id = a.remote_id AND b.item_type = a.item_type "
        "WHERE a.server = ?"
    ),
    "path": (
        "SELECT a.id, b.id FROM index_items a JOIN index_items b "
        "ON b.match_path = a.match_path AND b.server = ? "
        "WHERE a.server = ? AND a.match_path IS NOT NULL"
    ),
    "provider": (
        "SELECT DISTINCT a.entry, b.entry FROM index_keys a JOIN index_keys b "
        "ON b.key = a.key AND b.server = ? WHERE a.server = ?"
    ),
}


class LibraryIndexError(JfsyncError):
    """The index cannot be used (ledger not migrated, unknown server)."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One leaf item of one server, with what matching needs."""

    remote_id: str
    item_type: str
    name: str | None = None
    year: int | None = None
    path: str | None = None
    provider_ids: Mapping[str, str] = field(default_factory=dict)
    series_id: str | None = None
    season: int | None = None
    episode: int | None = None

    @classmethod
    def from_dto(cls, item: BaseItemDto) -> IndexEntry:
        """Read an ``/Items`` entry."""
        episode = item.type == "Episode"
        return cls(
            remote_id=item.id,
            item_type=item.type or "",
            name=item.name,
            year=item.production_year,
            path=item.path,
            provider_ids=dict(item.provider_ids),
            series_id=item.series_id if episode else None,
            season=item.parent_index_number if episode else None,
            episode=item.index_number if episode else None,
        )


@dataclass(frozen=True, slots=True)
class IndexedItem:
    """An index row as the status page and reports show it."""

    server: str
    remote_id: str
    item_type: str
    name: str | None
    year: int | None
    path: str | None
    provider_ids: Mapping[str, str]
    season: int | None = None
    episode: int | None = None

    def label(self) -> str:
        """A short readable name: ``Title (1999) [Movie]`` or ``Title S01E02 [Episode]``."""
        name = self.name or self.remote_id
        if self.season is not None and self.episode is not None:
            name += f" S{self.season:02d}E{self.episode:02d}"
        elif self.year:
            name += f" ({self.year})"
        return f"{name} [{self.item_type}]"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the status endpoint."""
        return {
            "server": self.server,
            "id": self.remote_id,
            "type": self.item_type,
            "name": self.label(),
            "path": self.path,
            "provider_ids": dict(self.provider_ids),
        }


@dataclass(frozen=True, slots=True)
class GroupRow:
    """One index entry with its match group and its current canonical key (if mapped)."""

    group: int
    refused: bool
    entry: int
    server: str
    remote_id: str
    key: str | None
    item_type: str


@dataclass(slots=True)
class ScanResult:
    """What one complete scan of a server found, and what it changed in the index."""

    server: str
    items: int = 0
    series: int = 0
    removed: int = 0
    #: Leaf items new or changed since the last scan.
    changed: int = 0
    #: Entries new, changed or removed, with what the changed and removed ones were linked
    #: to before (see :meth:`LibraryIndex.neighbours`); None when more than
    #: :data:`DIRTY_LIMIT` (match everything again).
    dirty: set[int] | None = field(default_factory=set)
    #: Remote ids of the items removed (their mappings may be stale).
    gone: set[str] = field(default_factory=set)
    #: Entries and series seen by the scan (not kept once it completed).
    seen: set[int] = field(default_factory=set, repr=False)
    seen_series: set[str] = field(default_factory=set, repr=False)
    #: Pages per transaction now (see :data:`TX_PAGES`), and how long the last one took.
    tx_pages: int = field(default=1, repr=False)
    tx_s: float = field(default=0.0, repr=False)

    def touch(self, entries: Iterable[int]) -> None:
        """Note entries as dirty (forgetting the list once it grows past the limit)."""
        if self.dirty is not None:
            self.dirty.update(entries)
            if len(self.dirty) > DIRTY_LIMIT:
                self.dirty = None


def normalise_path(path: str) -> str:
    """Use ``/`` as the separator (Windows servers report ``D:\\Media\\...``)."""
    return path.replace("\\", "/")


def match_path(rewrites: Sequence[PathRewrite], path: str | None) -> str | None:
    """Return ``path`` as matching compares it: separators normalised, first rewrite applied."""
    return _match_path(_normalised_rules(rewrites), path)


def _normalised_rules(rewrites: Sequence[PathRewrite]) -> list[tuple[str, str]]:
    return [
        (normalise_path(r.from_).rstrip("/"), normalise_path(r.to).rstrip("/")) for r in rewrites
    ]


def _match_path(rules: Sequence[tuple[str, str]], path: str | None) -> str | None:
    if not path:
        return None
    text = normalise_path(path) if "\\" in path else path
    for prefix, replacement in rules:
        if text.startswith(prefix) and (len(text) == len(prefix) or text[len(prefix)] == "/"):
            return replacement + text[len(prefix) :]
    return text


def provider_keys(entry: IndexEntry, series_ids: Mapping[str, str] | None) -> set[str]:
    """Return the provider-id match keys of an item (type included).

    Every identifying provider id gives ``Type|provider|value``; an episode with season and
    episode numbers also gives ``Episode|provider-series|value|season|episode`` for each
    identifying provider id of its series.
    """
    kind = entry.item_type
    keys = set()
    for name, value in entry.provider_ids.items():
        provider = _identifying(name)
        text = value.strip().lower()
        if provider and text:
            keys.add(f"{kind}|{provider}|{text}")
    if kind == "Episode" and entry.season is not None and entry.episode is not None:
        for name, value in (series_ids or {}).items():
            provider = _identifying(name)
            text = value.strip().lower()
            if provider and text:
                keys.add(f"Episode|{provider}-series|{text}|{entry.season}|{entry.episode}")
    return keys


_PROVIDER_NAMES: dict[str, str] = {}


def _identifying(name: str) -> str:
    """The lower-case provider name when it identifies one work, else ``""``."""
    found = _PROVIDER_NAMES.get(name)
    if found is None:
        lowered = name.lower()
        found = lowered if lowered in IDENTIFYING_PROVIDERS else ""
        if len(_PROVIDER_NAMES) < 1000:
            _PROVIDER_NAMES[name] = found
    return found


def _rewrites_text(server: ServerConfig) -> str:
    return json.dumps([[r.from_, r.to] for r in server.path_rewrites])


def index_path(ledger: str | Path) -> str:
    """The path of the library index file that goes with the ledger at ``ledger``."""
    return f"{ledger}{INDEX_SUFFIX}"


async def _connect(path: str, ledger: str) -> aiosqlite.Connection:
    """Open the index file at ``path`` (autocommit) with the ledger attached read-only.

    Like :func:`jfsync.sync.ledger.schema.connect`, the worker thread is a daemon (a
    connection left open never keeps the process alive). The ledger is attached with
    ``mode=ro``: this connection can never write it, and its write transactions take no lock
    on it (only a read snapshot).
    """
    pending = aiosqlite.connect(sqlite_uri(path), isolation_level=None, uri=True)
    worker = getattr(pending, "_thread", None)
    if worker is not None:
        worker.daemon = True
    db = await pending
    try:
        await db.execute("PRAGMA busy_timeout=5000")
        await db.execute("ATTACH DATABASE ? AS ledger", (sqlite_uri(ledger, "mode=ro"),))
    except BaseException:
        await db.close()
        raise
    return db


#: A lookup of at most this many ids (a live event's) is read on the event loop, through
#: :class:`_QuickReader`; larger ones go to the lookup connection's thread.
QUICK_LOOKUP = 32


class _QuickReader:
    """A read-only ``sqlite3`` connection to the ledger file, queried on the event loop.

    A live event's id map is one indexed SELECT of a few microseconds; sending it to a
    connection's thread and back costs far more whenever the two cores are busy (the hop's p99
    was 3.5 ms against 0.19 at p50). The ledger is in WAL mode, so this reader never waits for
    its writer, and each query is a read transaction of its own (autocommit, every row fetched):
    it sees every transaction committed before it, exactly as the lookup connection would. No
    busy wait: on any ``sqlite3.DatabaseError`` (a lock held by a checkpoint or a recovery, a
    file that cannot be opened) the caller takes the threaded path; after
    :data:`_QUICK_FAILURES` failures in a row the reader is closed for good.
    """

    def __init__(self, ledger: str) -> None:
        self._ledger = ledger
        self._conn: sqlite3.Connection | None = None
        self._failures = 0
        self._closed = False
        #: Lookups answered (the others went to the lookup connection's thread).
        self.answered = 0

    def rows(self, sql: str, parameters: Sequence[Any]) -> list[Any] | None:
        """The rows of ``sql``, or None when this reader cannot answer now (use the thread)."""
        if self._closed:
            return None
        try:
            rows = self._query(sql, parameters)
        except sqlite3.DatabaseError as err:
            # The lookup connection answers instead (and raises if the file is at fault).
            self._failures += 1
            logger.debug("quick index lookup failed (%s); asking the lookup connection", err)
            if self._failures >= _QUICK_FAILURES:
                self.close()
            return None
        self._failures = 0
        self.answered += 1
        return rows

    def _query(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._open()
        return conn.execute(sql, parameters).fetchall()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            sqlite_uri(self._ledger, "mode=ro"),
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=0,
        )
        try:
            # Never wait for a lock on the loop: a busy file is a fall back to the thread.
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA query_only=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close the connection (idempotent); later lookups take the thread."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


#: Failed quick lookups in a row after which the quick reader is given up.
_QUICK_FAILURES = 20


def _create_private(path: str) -> None:
    """Create an empty file readable by its owner only, like the ledger (the index holds
    the paths and titles of every library)."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _remove_files(path: str) -> None:
    """Delete an index file with its journal, WAL and shared-memory files."""
    for name in (path, f"{path}-journal", f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


PageHook = Callable[[str, int], Awaitable[None]]

#: Where the index file's build stands: its tables are being filled in bulk (no secondary
#: index, no journal), the indexes are being made, or it is complete (WAL, marked).
BuildState = Literal["building", "finishing", "ready"]


class LibraryIndex:
    """The index tables of the ledger file, on two connections of their own."""

    def __init__(self, path: str | Path, servers: Sequence[ServerConfig]) -> None:
        self._path = str(path)
        self._file = index_path(path)
        self._servers = {s.name: s for s in servers}
        self._order = [s.name for s in servers]
        self._bulk: aiosqlite.Connection | None = None
        self._lookup: aiosqlite.Connection | None = None
        #: Small id lookups read on the loop (see :class:`_QuickReader`), while open.
        self._quick: _QuickReader | None = None
        self._sids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        #: Serialises the bulk connection's use; writes go through its transactions.
        self._gate = WriteGate()
        #: One scan or refresh per server at a time (scan generations must not interleave).
        self._server_locks = {s.name: asyncio.Lock() for s in servers}
        #: Per server id: its rewrites as (normalised prefix, replacement) pairs.
        self._rules: dict[int, list[tuple[str, str]]] = {}
        #: Per server id: whether two of its items share a provider-id key (versions of a
        #: film). Cleared by every write transaction; most libraries have none.
        self._has_siblings: dict[int, bool] = {}
        self._writes = 0  # write transactions begun: a cached answer read across one is dropped
        #: Per server with a library filter: the scope its last scan resolved (issue 14).
        self._scopes: dict[str, LibraryScope] = {}
        #: The file's build (see the module docstring), the servers whose first scan is
        #: filling it in bulk now, and those whose bulk scan failed (their rows are partial).
        self._state: BuildState = "ready"
        self._bulk_scans: set[int] = set()
        self._partial: set[int] = set()
        #: Set (and replaced) whenever the build's state or its scans change.
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"LibraryIndex({self._path!r})"

    # ------------------------------------------------------------------ lifecycle

    @property
    def path(self) -> str:
        """The index file."""
        return self._file

    @property
    def state(self) -> BuildState:
        """Where the index file's build stands (``ready`` once complete)."""
        return self._state

    async def open(self) -> None:
        """Open the index file (the ledger must be open: it migrates the ledger).

        A missing file is created; one that was never completed, is of another layout or
        names the ledger's servers differently is deleted and created anew (logged): the
        scans fill it again.
        """
        if self._bulk is not None:
            return
        if self._path == ":memory:":
            raise LibraryIndexError("the library index needs a ledger file, not :memory:")
        bulk = await self._open_file()
        lookup: aiosqlite.Connection | None = None
        try:
            lookup = await _connect(self._file, self._path)
            # Scans insert into several large b-trees; a bigger page cache saves most re-reads.
            await bulk.execute(f"PRAGMA main.cache_size=-{BULK_CACHE_KIB}")
            # The matcher's scratch tables and the sorts that make the indexes spill to
            # temporary files beyond the page cache. Kept in memory they saved writing about
            # 0.6x the index's size again, but the sorts of a 2 x 200k build then held some
            # 75 MB at the reconcile's peak (274 MB against 198 MB with files). Set before
            # the scratch tables are made: changing it drops them.
            await bulk.execute("PRAGMA temp_store=FILE")
            # Emptying the scratch tables after each match must not overwrite every page they
            # used with zeros (SQLite may be built with secure_delete on, Debian's is: at 2 x
            # 100k that wrote 15 MiB per match); nor journal them on disk: they are derived
            # ids in a file deleted on close, and a rollback still works with the journal in
            # memory (what a scratch statement changes is mostly new pages, never journalled).
            await bulk.execute("PRAGMA temp.secure_delete=OFF")
            await bulk.execute("PRAGMA temp.journal_mode=MEMORY")
            for sid, name in await bulk.execute_fetchall("SELECT id, name FROM ledger.servers"):
                self._sids[str(name)] = int(sid)
                self._names[int(sid)] = str(name)
                config = self._servers.get(str(name))
                self._rules[int(sid)] = _normalised_rules(config.path_rewrites if config else [])
            missing = [n for n in self._order if n not in self._sids]
            if missing:
                raise LibraryIndexError(f"the ledger does not know servers {', '.join(missing)}")
            for statement in _TEMP_TABLES:
                await bulk.execute(statement)
        except BaseException:
            await bulk.close()
            if lookup is not None:
                await lookup.close()
            raise
        self._bulk, self._lookup = bulk, lookup
        self._quick = _QuickReader(self._path)
        if self._state == "ready":
            for name in self._order:
                await self._check_rewrites(name)

    async def _open_file(self) -> aiosqlite.Connection:
        """Connect to a complete index file, or to a new one in its bulk build."""
        file = self._file
        if await asyncio.to_thread(os.path.exists, file):
            found: aiosqlite.Connection | None = None
            try:
                found = await _connect(file, self._path)
                await self._check_ledger(found)
                problem = await self._stale(found)
                if problem is None:
                    await self._journal(found, "wal")
                    await found.execute("PRAGMA main.synchronous=NORMAL")
                    self._state = "ready"
                    return found
            except sqlite3.DatabaseError as err:
                problem = f"cannot be read ({err})"
            except BaseException:
                if found is not None:
                    await found.close()
                raise
            if found is not None:
                await found.close()
            logger.warning(
                "library index %s %s; building it again from a scan of each server", file, problem
            )
            await asyncio.to_thread(_remove_files, file)
        await asyncio.to_thread(_create_private, file)
        db = await _connect(file, self._path)
        try:
            await self._check_ledger(db)
            await self._journal(db, "memory")
            await db.execute("PRAGMA main.synchronous=OFF")
            await db.execute("BEGIN IMMEDIATE")
            for statement in _FILE_TABLES:
                await db.execute(statement)
            await db.execute("INSERT INTO index_meta(key, value) VALUES ('state', 'building')")
            await db.execute(f"PRAGMA main.user_version = {INDEX_FILE_VERSION}")
            await db.commit()
        except BaseException:
            await db.close()
            raise
        self._state = "building"
        return db

    async def _check_ledger(self, db: aiosqlite.Connection) -> None:
        rows = await db.execute_fetchall("PRAGMA ledger.user_version")
        version = int(next(iter(rows))[0])
        if version < INDEX_SCHEMA_VERSION:
            raise LibraryIndexError(
                f"the ledger {self._path} has schema {version}; open the Ledger first "
                f"(it migrates to {INDEX_SCHEMA_VERSION})"
            )

    @staticmethod
    async def _stale(db: aiosqlite.Connection) -> str | None:
        """Why an existing index file cannot be used (None: it can)."""
        rows = await db.execute_fetchall("PRAGMA main.user_version")
        version = int(next(iter(rows))[0])
        tables = {
            str(r[0])
            for r in await db.execute_fetchall(
                "SELECT name FROM main.sqlite_master WHERE type='table'"
            )
        }
        if "index_meta" not in tables:
            if tables:
                raise LibraryIndexError(
                    "the library index file is not one: it holds tables "
                    f"{', '.join(sorted(tables)[:5])}; move it away (jfsync builds its index there)"
                )
            return "is empty"
        if version != INDEX_FILE_VERSION:
            return (
                f"has another layout (version {version}, this jfsync writes {INDEX_FILE_VERSION})"
            )
        rows = await db.execute_fetchall("SELECT value FROM index_meta WHERE key='state'")
        if [str(r[0]) for r in rows] != [_READY]:
            return "was not completed (its build was cut short)"
        rows = await db.execute_fetchall(
            "SELECT s.id FROM index_servers s LEFT JOIN ledger.servers l ON l.id = s.id "
            "WHERE l.name IS NULL OR l.name <> s.name LIMIT 1"
        )
        if list(rows):
            return "names servers the ledger does not (it belongs to another ledger)"
        return None

    @staticmethod
    async def _journal(db: aiosqlite.Connection, mode: str) -> None:
        rows = await db.execute_fetchall(f"PRAGMA main.journal_mode={mode}")
        found = str(next(iter(rows))[0]).lower()
        if found != mode:
            raise LibraryIndexError(f"the library index cannot use journal_mode={mode} ({found})")

    async def close(self) -> None:
        """Close both connections (idempotent). A build not completed yet stays unmarked: the
        next :meth:`open` starts it again."""
        bulk, self._bulk = self._bulk, None
        lookup, self._lookup = self._lookup, None
        quick, self._quick = self._quick, None
        if quick is not None:
            quick.close()
        for db in (bulk, lookup):
            if db is not None:
                await db.close()

    @property
    def quick_lookups(self) -> int:
        """Small id lookups answered on the event loop since the index was opened."""
        return 0 if self._quick is None else self._quick.answered

    @property
    def rows_written(self) -> int:
        """Rows the index inserted, changed or deleted since it was opened (scans, refreshes
        and the matcher's scratch tables)."""
        return 0 if self._bulk is None else self._bulk.total_changes

    @property
    def servers(self) -> list[str]:
        """The configured servers, in config order."""
        return list(self._order)

    def sid(self, server: str) -> int:
        """The ledger's id of a configured server."""
        try:
            return self._sids[server]
        except KeyError:
            raise LibraryIndexError(f"unknown server {server!r}") from None

    def rank(self, sid: int) -> int:
        """The config position of a server id (unknown servers last)."""
        name = self._names.get(sid)
        return self._order.index(name) if name in self._order else len(self._order)

    def name_of(self, sid: int) -> str:
        """The config name of a server id."""
        return self._names[sid]

    # ------------------------------------------------------------------ library filters

    def set_servers(self, servers: Sequence[ServerConfig]) -> None:
        """Take new settings of known servers (a config reload): library filters, rewrites.

        A changed filter takes effect at the server's next scan; forget its resolved scope.
        """
        for server in servers:
            old = self._servers.get(server.name)
            if old is not None and old.libraries != server.libraries:
                self._scopes.pop(server.name, None)
            self._servers[server.name] = server

    def scope(self, server: str) -> LibraryScope | None:
        """The library scope of the server's last scan (None: no filter, or not scanned yet)."""
        config = self._servers.get(server)
        if config is None or config.libraries is None:
            return None
        return self._scopes.get(server)

    async def library_parents(self, client: JellyfinClient, server: str) -> list[str] | None:
        """The library ids a user scan of ``server`` must be limited to (None: the whole
        server). Resolves the filter first when no scan has yet."""
        scope = await self._scope_for(client, server)
        return None if scope is None else scope.parent_ids

    async def _scope_for(self, client: JellyfinClient, server: str) -> LibraryScope | None:
        config = self._servers.get(server)
        if config is None or config.libraries is None:
            self._scopes.pop(server, None)
            return None
        scope = self._scopes.get(server)
        if scope is None:
            scope = await resolve_scope(client, server, config.libraries)
            assert scope is not None
            self._scopes[server] = scope
            logger.info("[%s] library filter: %s", server, scope.describe())
        return scope

    @staticmethod
    async def _listing(
        client: JellyfinClient, scope: LibraryScope | None, **query: Any
    ) -> AsyncIterator[BaseItemDto]:
        """``iter_items(None, **query)`` over the whole server, or each synced library."""
        if scope is None:
            async for item in client.iter_items(None, **query):
                yield item
            return
        seen: set[str] = set()
        for parent in scope.parent_ids:
            async for item in client.iter_items(None, parent_id=parent, **query):
                if item.id not in seen:
                    seen.add(item.id)
                    yield item

    # ------------------------------------------------------------------ scanning

    async def scan(
        self,
        client: JellyfinClient,
        server: str,
        wall_ms: int,
        *,
        page_size: int = PAGE_SIZE,
        on_page: PageHook | None = None,
        more_first_scans: bool = False,
    ) -> ScanResult:
        """Scan the server's whole library into the index, one transaction per page.

        Series come first (episodes' keys need their provider ids), then the leaf items. Rows
        the scan did not see are dropped only when it completes; a failing scan leaves the
        previous index in place. ``on_page(server, items_so_far)`` runs after every page.
        ``more_first_scans``: the caller scans more servers right after this one (one at a
        time), so a bulk build is not finished when this scan ends but by the next scan that
        is not a first one, or the first query that needs the indexes (:meth:`ready`).
        """
        sid = self.sid(server)
        async with self._server_locks[server]:
            fresh = await self._begin_bulk(sid)
            if not fresh:
                await self.ready()
            try:
                result = await self._scan(client, server, sid, wall_ms, page_size, on_page, fresh)
            except BaseException:
                if fresh:
                    self._partial.add(sid)
                raise
            finally:
                if fresh:
                    self._bulk_scans.discard(sid)
                    self._notify()
            if fresh and not self._bulk_scans and not more_first_scans:
                await self.ready()  # the last first scan: make the indexes now
            return result

    async def ready(self) -> None:
        """Wait until the index file is complete (its indexes made): at once unless a bulk
        build is under way. When no first scan is running any more, make the indexes here
        (rows of servers whose bulk scan failed are dropped first)."""
        while self._state != "ready":
            if self._state == "building" and not self._bulk_scans:
                self._state = "finishing"
                try:
                    await self._finalize()
                except BaseException:
                    self._state = "building"  # the next caller tries again
                    self._notify()
                    raise
                self._state = "ready"
                self._notify()
                continue
            await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _begin_bulk(self, sid: int) -> bool:
        """Whether this scan of ``sid`` fills the file in bulk (its first, while the file is
        being built); if so it is registered as such (the indexes wait for its end)."""
        if self._state != "building":
            return False
        rows = await self._db().execute_fetchall(
            "SELECT 1 FROM index_scans WHERE server=? AND complete_ms IS NOT NULL", (sid,)
        )
        if list(rows) or self._state != "building":
            return False
        self._bulk_scans.add(sid)
        try:
            async with self._tx() as db:
                if sid in self._partial:
                    # What a failed earlier attempt stored (a bulk scan starts from nothing).
                    for table in ("index_keys", "index_items", "index_series"):
                        await db.execute(f"DELETE FROM {table} WHERE server=?", (sid,))  # noqa: S608
                await self._name_server(db, sid)
            self._partial.discard(sid)
        except BaseException:
            self._bulk_scans.discard(sid)
            self._notify()
            raise
        return True

    async def _name_server(self, db: aiosqlite.Connection, sid: int) -> None:
        """Note which ledger server ``sid`` is (checked against the ledger at open; ids never
        change names within one ledger, so a present row is left alone)."""
        await db.execute(
            "INSERT OR IGNORE INTO index_servers(id, name) VALUES (?, ?)", (sid, self._names[sid])
        )

    async def _finalize(self) -> None:
        """End the bulk build: drop partial rows, make the indexes (synced), switch to WAL,
        then mark the file complete."""
        db = self._db()
        started = time.perf_counter()
        # Synced from here: the indexes' commit flushes every page the build wrote, so the
        # mark below can never reach the disk before them.
        await db.execute("PRAGMA main.synchronous=FULL")
        async with self._tx() as db:
            for table in ("index_keys", "index_items", "index_series"):
                await db.execute(
                    f"DELETE FROM {table} WHERE server NOT IN "  # noqa: S608 - fixed names
                    "(SELECT server FROM index_scans WHERE complete_ms IS NOT NULL)"
                )
            for statement in _FILE_INDEXES:
                await db.execute(statement)
        async with self._gate.lock:
            await self._journal(db, "wal")
        async with self._tx() as db:
            await db.execute("UPDATE index_meta SET value=? WHERE key='state'", (_READY,))
        await db.execute("PRAGMA main.synchronous=NORMAL")
        self._partial.clear()
        rows = await db.execute_fetchall("SELECT COUNT(*) FROM index_items")
        logger.info(
            "library index built: %d items, indexes made in %.1f s (%s)",
            int(next(iter(rows))[0]),
            time.perf_counter() - started,
            self._file,
        )

    async def _scan(
        self,
        client: JellyfinClient,
        server: str,
        sid: int,
        wall_ms: int,
        page_size: int,
        on_page: PageHook | None,
        fresh: bool = False,
    ) -> ScanResult:
        """One scan; ``fresh``: the server has no rows (a bulk scan), every item is new."""
        gen = await self._current_gen(sid) + 1
        result = ScanResult(server)
        series: dict[str, dict[str, str]] = {}
        moved: set[str] = set()
        batch: list[BaseItemDto] = []
        # A filtered server is read library by library: excluded ones are never listed.
        self._scopes.pop(server, None)
        scope = await self._scope_for(client, server)
        async for item in self._listing(
            client, scope, include_types=("Series",), fields=("ProviderIds",), page_size=page_size
        ):
            batch.append(item)
            if len(batch) >= page_size:
                series.update(await self._store_series(sid, gen, batch, moved))
                batch = []
        if batch:
            series.update(await self._store_series(sid, gen, batch, moved))
        result.seen_series.update(series)
        rekey = frozenset(moved)
        result.series = len(series)
        page: list[IndexEntry] = []
        # The rows and match keys of the page's items, worked out here as the items come, a
        # slice at a time: that is Python work, and done on another thread it held the GIL
        # against the event loop (which then waited up to 65 ms for it at 2 x 200k items).
        prepared = _Prepared()
        rules = self._rules[sid]
        # A page is stored (in SQLite's thread) while the next one is fetched and parsed.
        storing: asyncio.Task[None] | None = None
        try:
            async for item in self._listing(
                client,
                scope,
                include_types=DEFAULT_ITEM_TYPES,
                fields=("Path", "ProviderIds"),
                page_size=page_size,
            ):
                page.append(IndexEntry.from_dto(item))
                if len(page) % _SLICE == 0:
                    prepared.add(rules, page[-_SLICE:], series)
                    await asyncio.sleep(0)  # a listing page is 1,000 items: let the loop run
                if len(page) >= page_size * result.tx_pages:
                    prepared.add(rules, page[len(page) - len(page) % _SLICE :], series)
                    if storing is not None:
                        await storing
                    storing = asyncio.create_task(
                        self._store_page(sid, gen, page, prepared, series, rekey, result, fresh),
                        name=f"jfsync-index-store[{server}]",
                    )
                    result.items += len(page)
                    page = []
                    prepared = _Prepared()
                    if on_page is not None:
                        await storing
                        await on_page(server, result.items)
            if storing is not None:
                await storing
            if page:
                prepared.add(rules, page[len(page) - len(page) % _SLICE :], series)
                await self._store_page(sid, gen, page, prepared, series, rekey, result, fresh)
                result.items += len(page)
                if on_page is not None:
                    await on_page(server, result.items)
        finally:
            if storing is not None and not storing.done():
                storing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await storing
        await self._finish(sid, gen, wall_ms, result, fresh)
        result.seen = set()
        result.seen_series = set()
        return result

    async def refresh_items(
        self, client: JellyfinClient, server: str, ids: Iterable[str]
    ) -> tuple[int, int]:
        """Re-read some items (added or updated) by id; return (leaf items new or changed,
        series whose provider ids changed).

        A series among them also re-keys its episodes already in the index.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return 0, 0
        sid = self.sid(server)
        async with self._server_locks[server]:
            await self.ready()
            scope = await self._scope_for(client, server)
            return await self._refresh(client, sid, wanted, scope)

    async def _refresh(
        self, client: JellyfinClient, sid: int, wanted: list[str], scope: LibraryScope | None
    ) -> tuple[int, int]:
        gen = await self._current_gen(sid)
        leaves: list[IndexEntry] = []
        found_series: list[BaseItemDto] = []
        async for item in client.iter_items(
            None,
            ids=wanted,
            include_types=(*DEFAULT_ITEM_TYPES, "Series"),
            fields=("Path", "ProviderIds"),
        ):
            if item.type == "Series":
                found_series.append(item)
            elif item.type in DEFAULT_ITEM_TYPES:
                leaves.append(IndexEntry.from_dto(item))
        if scope is not None:
            # Read by id, an item is placed by its path; one outside the synced libraries is
            # not stored (and dropped if it moved out of them).
            out = [e.remote_id for e in leaves if not scope.allows_path(e.path)]
            if out:
                leaves = [e for e in leaves if scope.allows_path(e.path)]
                for chunk in _chunks(out, _CHUNK):
                    await self._remove(sid, chunk)
        stored = 0
        moved: set[str] = set()
        series = await self._store_series(sid, gen, found_series, moved) if found_series else {}
        if moved:
            await self._rekey_series_episodes(sid, {k: series[k] for k in moved})
        known = await self._series_ids(sid, {e.series_id for e in leaves if e.series_id})
        known.update(series)
        for start in range(0, len(leaves), PAGE_SIZE):
            stored += await self._store_items(sid, gen, leaves[start : start + PAGE_SIZE], known)
        return stored, len(moved)

    async def remove_items(self, server: str, ids: Iterable[str]) -> int:
        """Drop some items from the index (``ItemsRemoved``); return how many were there."""
        sid = self.sid(server)
        wanted = sorted(set(ids))
        removed = 0
        async with self._server_locks[server]:
            await self.ready()
            for chunk in _chunks(wanted, _CHUNK):
                removed += await self._remove(sid, chunk)
        return removed

    async def _remove(self, sid: int, chunk: Sequence[str]) -> int:
        async with self._tx() as db:
            await db.execute(
                "DELETE FROM index_keys WHERE entry IN (SELECT id FROM index_items "  # noqa: S608
                f"WHERE server=? AND remote_id IN ({_marks(len(chunk))}))",
                (sid, *chunk),
            )
            cursor = await db.execute(
                f"DELETE FROM index_items WHERE server=? AND remote_id IN ({_marks(len(chunk))})",  # noqa: S608
                (sid, *chunk),
            )
            removed = cursor.rowcount
            await cursor.close()
            await db.execute(
                f"DELETE FROM index_series WHERE server=? AND remote_id IN ({_marks(len(chunk))})",  # noqa: S608
                (sid, *chunk),
            )
        return removed

    async def complete(self, server: str) -> bool:
        """Tell whether a complete scan of the server was ever stored."""
        rows = await self._db().execute_fetchall(
            "SELECT complete_ms FROM index_scans WHERE server=?", (self.sid(server),)
        )
        return any(r[0] is not None for r in rows)

    async def scanned_at(self) -> dict[str, int | None]:
        """When each configured server's last complete scan ended (wall ms)."""
        rows = await self._db().execute_fetchall("SELECT server, complete_ms FROM index_scans")
        found = {int(r[0]): r[1] for r in rows}
        return {
            n: (None if found.get(self._sids[n]) is None else int(found[self._sids[n]]))
            for n in self._order
        }

    async def counts(self) -> dict[str, int]:
        """Leaf items in the index per configured server (read on the lookup connection, in
        its own thread: it can run while the bulk connection does something else)."""
        rows = await self._lookup_db().execute_fetchall(
            "SELECT server, COUNT(*) FROM index_items GROUP BY server"
        )
        found = {int(r[0]): int(r[1]) for r in rows}
        return {n: found.get(self._sids[n], 0) for n in self._order}

    # ------------------------------------------------------------------ matching queries

    async def edges(self, rule: Rule, a: str, b: str) -> list[tuple[int, int]]:
        """Candidate pairs (entry on ``a``, entry on ``b``) under one matching rule."""
        await self.ready()
        rows = await self._db().execute_fetchall(_EDGE_SQL[rule], (self.sid(b), self.sid(a)))
        return _int_pairs(rows)

    async def mapped_pairs(self, a: str, b: str) -> list[tuple[int, int]]:
        """Pairs of entries that the ledger maps to the same canonical item."""
        await self.ready()
        rows = await self._db().execute_fetchall(
            "SELECT ea.id, eb.id FROM server_items sa "
            "JOIN server_items sb ON sb.server = ? AND sb.item = sa.item "
            "JOIN index_items ea ON ea.server = sa.server AND ea.remote_id = sa.remote_id "
            "JOIN index_items eb ON eb.server = sb.server AND eb.remote_id = sb.remote_id "
            "WHERE sa.server = ?",
            (self.sid(b), self.sid(a)),
        )
        return _int_pairs(rows)

    async def entry_servers(self, scope: Iterable[int]) -> dict[int, int]:
        """Entry -> server id for the entries in ``scope`` of a configured server (all of
        them: :meth:`entry_server_table`)."""
        await self.ready()
        sids = [self._sids[n] for n in self._order]
        found: dict[int, int] = {}
        for chunk in _chunks(sorted(set(scope)), _CHUNK):
            rows = await self._db().execute_fetchall(
                f"SELECT id, server FROM index_items WHERE server IN ({_marks(len(sids))}) "  # noqa: S608
                f"AND id IN ({_marks(len(chunk))})",
                (*sids, *chunk),
            )
            found.update((int(r[0]), int(r[1])) for r in rows)
        return found

    async def entry_server_table(self) -> bytearray | dict[int, int]:
        """Entry -> server id for every entry of a configured server, built on SQLite's thread
        from the rows as they come (the event loop never walks the whole index, and no dict of
        the whole index is made on the way).

        Returned as a table indexed by entry holding the server id plus one (0: no entry), one
        byte an entry, when the entries are dense enough and the server ids fit a byte; as a
        dict otherwise (sparse entry ids, server ids over 254).
        """
        await self.ready()
        sids = [self._sids[n] for n in self._order]
        where = f"WHERE server IN ({_marks(len(sids))})"

        def build(conn: sqlite3.Connection) -> bytearray | dict[int, int]:
            low, top, count = conn.execute(
                f"SELECT MIN(id), MAX(id), COUNT(*) FROM index_items {where}",  # noqa: S608
                sids,
            ).fetchone()
            rows = conn.execute(f"SELECT id, server FROM index_items {where}", sids)  # noqa: S608
            return entry_table(rows, count, low or 0, top or 0, sids)

        return await run_on_thread(self._db(), build)

    async def entries_of(self, server: str, remote_ids: Iterable[str]) -> dict[str, int]:
        """Remote id -> index entry, for the server's ids among ``remote_ids`` the index holds."""
        await self.ready()
        sid = self.sid(server)
        found: dict[str, int] = {}
        for chunk in _chunks(sorted(set(remote_ids)), _CHUNK):
            rows = await self._db().execute_fetchall(
                f"SELECT remote_id, id FROM index_items WHERE server=? AND remote_id IN ({_marks(len(chunk))})",  # noqa: S608, E501
                (sid, *chunk),
            )
            found.update((str(r[0]), int(r[1])) for r in rows)
        return found

    async def neighbours(self, entries: Iterable[int]) -> set[int]:
        """The entries of other configured servers linked to one of ``entries``: a candidate
        pair under some matching rule (same id and type, same match path, a shared
        provider-id key) or mapped to the same canonical item. Matching results of an entry
        depend only on what these links connect it to."""
        await self.ready()
        sids = [self._sids[n] for n in self._order]
        marks = _marks(len(sids))
        found: set[int] = set()
        for chunk in _chunks(sorted(set(entries)), _CHUNK):
            ids = _marks(len(chunk))
            rows = await self._db().execute_fetchall(
                "SELECT b.id FROM index_items a JOIN index_items b "  # noqa: S608
                f"ON b.server IN ({marks}) AND b.remote_id = a.remote_id "
                "AND b.item_type = a.item_type AND b.server <> a.server "
                f"WHERE a.id IN ({ids}) "
                "UNION SELECT b.id FROM index_items a JOIN index_items b "
                "ON b.match_path = a.match_path AND b.server <> a.server "
                f"WHERE a.id IN ({ids}) AND a.match_path IS NOT NULL "
                f"AND b.server IN ({marks}) "
                "UNION SELECT kb.entry FROM index_keys ka JOIN index_keys kb "
                f"ON kb.server IN ({marks}) AND kb.key = ka.key AND kb.server <> ka.server "
                f"WHERE ka.entry IN ({ids}) "
                "UNION SELECT b.id FROM index_items a JOIN server_items sa "
                "ON sa.server = a.server AND sa.remote_id = a.remote_id "
                f"JOIN server_items sb ON sb.server IN ({marks}) AND sb.item = sa.item "
                "AND sb.server <> sa.server "
                "JOIN index_items b ON b.server = sb.server AND b.remote_id = sb.remote_id "
                f"WHERE a.id IN ({ids})",
                (*sids, *chunk, *chunk, *sids, *sids, *chunk, *sids, *chunk),
            )
            found.update(int(r[0]) for r in rows)
        return found

    async def closure(self, entries: Iterable[int], limit: int) -> set[int] | None:
        """``entries`` with every entry linked to them, directly or not (see
        :meth:`neighbours`); None when that grows past ``limit`` entries."""
        found = set(entries)
        frontier = set(found)
        while frontier:
            if len(found) > limit:
                return None
            frontier = await self.neighbours(frontier) - found
            found |= frontier
        return found if len(found) <= limit else None

    async def scoped_edges(
        self, rule: Rule, a: str, b: str, scope: Iterable[int]
    ) -> list[tuple[int, int]]:
        """:meth:`edges` of the entries of ``a`` in ``scope`` (a set closed under links)."""
        await self.ready()
        column = "a.entry" if rule == "provider" else "a.id"
        # The scope's entries first, looked up by id (CROSS JOIN, ``+``), then their
        # candidates: left to itself SQLite walked every entry of one of the two servers for
        # the id and path rules.
        sql = (
            _EDGE_SQL[rule]
            .replace(" JOIN ", " CROSS JOIN ", 1)
            .replace("WHERE a.server = ?", "WHERE +a.server = ?")
        )
        found: list[tuple[int, int]] = []
        for chunk in _chunks(sorted(set(scope)), _CHUNK):
            rows = await self._db().execute_fetchall(
                f"{sql} AND {column} IN ({_marks(len(chunk))})",
                (self.sid(b), self.sid(a), *chunk),
            )
            found.extend((int(r[0]), int(r[1])) for r in rows)
        return found

    async def scoped_mapped_pairs(
        self, a: str, b: str, scope: Iterable[int]
    ) -> list[tuple[int, int]]:
        """:meth:`mapped_pairs` of the entries of ``a`` in ``scope``."""
        await self.ready()
        found: list[tuple[int, int]] = []
        for chunk in _chunks(sorted(set(scope)), _CHUNK):
            rows = await self._db().execute_fetchall(
                "SELECT ea.id, eb.id FROM index_items ea "  # noqa: S608
                "JOIN server_items sa ON sa.server = ea.server AND sa.remote_id = ea.remote_id "
                "JOIN server_items sb ON sb.server = ? AND sb.item = sa.item "
                "JOIN index_items eb ON eb.server = sb.server AND eb.remote_id = sb.remote_id "
                # ``+``: look the entries up by id, not through every entry of the server.
                f"WHERE +ea.server = ? AND ea.id IN ({_marks(len(chunk))})",
                (self.sid(b), self.sid(a), *chunk),
            )
            found.extend((int(r[0]), int(r[1])) for r in rows)
        return found

    async def group_rows(
        self,
        groups: Mapping[int, int | None],
        fetch: int = 2000,
        scope: Iterable[int] | None = None,
    ) -> AsyncIterator[list[GroupRow]]:
        """Stream the entries of every group whose id map may need a change.

        ``groups`` maps entries to their group (None = refused); entries not in it are
        groups of their own (negative ids). A group is left out when nothing can change for
        it: all its members are mapped to one canonical item that no other group holds (or
        it is refused and none is mapped). Rows come ordered by group, so a group's members
        arrive together (possibly across two lists); groups come in the order of the remote
        id of their member on the earliest configured server (the key a new group takes), so
        the id maps are written in key order. With ``scope`` (a set of entries closed
        under links, see :meth:`neighbours`), only the groups of those entries are looked at.
        """
        await self.ready()
        async with self._gate.lock:
            async for rows in self._group_rows(groups, fetch, scope):
                yield rows

    async def _group_rows(
        self, groups: Mapping[int, int | None], fetch: int, scope: Iterable[int] | None
    ) -> AsyncIterator[list[GroupRow]]:
        db = self._db()
        tables = ("match_groups", "group_members", "dirty_groups", "match_scope", "group_order")
        for table in tables:
            await db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
        pending = iter(groups.items())
        while chunk := list(itertools.islice(pending, 5000)):
            await db.executemany("INSERT INTO match_groups(entry, grp) VALUES (?, ?)", chunk)
            await asyncio.sleep(0)
        sids = [self._sids[n] for n in self._order]
        source = "index_items e"
        if scope is not None:
            await db.executemany(
                "INSERT OR IGNORE INTO match_scope(entry) VALUES (?)", [(e,) for e in scope]
            )
            # From the scope's entries, never through every entry of the servers.
            source = "match_scope s CROSS JOIN index_items e ON e.id = s.entry"
        await db.execute(
            "INSERT INTO group_members(grp, entry, refused, item) "  # noqa: S608
            "SELECT COALESCE(g.grp, -e.id), e.id, (g.entry IS NOT NULL AND g.grp IS NULL), "
            f"si.item FROM {source} LEFT JOIN match_groups g ON g.entry = e.id "
            "LEFT JOIN server_items si ON si.server = e.server AND si.remote_id = e.remote_id "
            f"WHERE e.server IN ({_marks(len(sids))}) ORDER BY 1, 2",
            sids,
        )
        await db.execute(
            "INSERT OR IGNORE INTO dirty_groups(grp) SELECT grp FROM group_members GROUP BY grp "
            "HAVING (MAX(refused) = 1 AND COUNT(item) > 0) OR (MAX(refused) = 0 AND "
            "(COUNT(item) < COUNT(*) OR MIN(item) <> MAX(item)))"
        )
        await db.execute(
            "INSERT OR IGNORE INTO dirty_groups(grp) SELECT grp FROM group_members "
            "WHERE item IS NOT NULL AND item IN "
            "(SELECT item FROM group_members WHERE item IS NOT NULL GROUP BY item "
            "HAVING COUNT(DISTINCT grp) > 1)"
        )
        # Groups come in the order of their member on the earliest server (config order):
        # the id maps are then written in key order, page after page, not all over them.
        # The order is one sort of the groups' short sort keys, made here (group_order is
        # filled in its key order); the members' rows are then read in it without a sort of
        # their own (at 2 x 100k, sorting the rows wrote some 36 MiB of temporary files).
        # Each entry is in one group, so a group's sort key (its earliest member) is unique.
        rank = " ".join(f"WHEN {sid} THEN {n}" for n, sid in enumerate(sids))
        await db.execute(
            "INSERT INTO group_order(sort, grp) "  # noqa: S608 - server ids are ints
            f"SELECT MIN(printf('%04d', CASE e.server {rank} ELSE 9999 END) || e.remote_id), "
            "m.grp FROM dirty_groups d JOIN group_members m ON m.grp = d.grp "
            "JOIN index_items e ON e.id = m.entry GROUP BY m.grp ORDER BY 1"
        )
        sql = (
            "SELECT m.grp, m.refused, e.id, e.server, e.remote_id, i.key, e.item_type "
            "FROM group_order o JOIN group_members m ON m.grp = o.grp "
            "JOIN index_items e ON e.id = m.entry LEFT JOIN items i ON i.id = m.item "
            "ORDER BY o.sort"
        )
        async with db.execute(sql) as cursor:
            while True:
                rows = await cursor.fetchmany(fetch)
                if not rows:
                    break
                yield [
                    GroupRow(
                        group=int(r[0]),
                        refused=bool(r[1]),
                        entry=int(r[2]),
                        server=self._names[int(r[3])],
                        remote_id=str(r[4]),
                        key=None if r[5] is None else str(r[5]),
                        item_type=str(r[6]),
                    )
                    for r in rows
                ]
        for table in tables:
            await db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names

    async def stale_mappings(
        self, server: str, among: Iterable[str] | None = None
    ) -> list[tuple[str, str]]:
        """(remote id, canonical key) of the server's mappings whose item left the index
        (only those of the remote ids ``among``, when given)."""
        await self.ready()
        sql = (
            "SELECT si.remote_id, i.key FROM server_items si JOIN items i ON i.id = si.item "
            "WHERE si.server = ? AND NOT EXISTS (SELECT 1 FROM index_items e "
            "WHERE e.server = si.server AND e.remote_id = si.remote_id)"
        )
        sid = self.sid(server)
        if among is None:
            rows = await self._db().execute_fetchall(sql, (sid,))
            return [(str(r[0]), str(r[1])) for r in rows]
        found: list[tuple[str, str]] = []
        for chunk in _chunks(sorted(set(among)), _CHUNK):
            rows = await self._db().execute_fetchall(
                f"{sql} AND si.remote_id IN ({_marks(len(chunk))})", (sid, *chunk)
            )
            found.extend((str(r[0]), str(r[1])) for r in rows)
        return found

    async def mapped_keys(self) -> dict[str, KeySet]:
        """The canonical keys each configured server's id map holds now.

        Hundreds of thousands of rows: put into the key sets on SQLite's thread as they are
        read, never held as a list of rows nor walked by the event loop (nor by the garbage
        collector: see :data:`jfsync.heap.KeySet`).
        """
        found: dict[str, KeySet] = {n: {} for n in self._order}
        sql = "SELECT si.server, i.key FROM server_items si JOIN items i ON i.id = si.item"
        await run_on_thread(self._db(), lambda conn: self._add_held(found, conn.execute(sql)))
        return found

    async def held_keys(
        self, keys: Iterable[str], prefixes: Iterable[str] = ()
    ) -> dict[str, KeySet]:
        """Like :meth:`mapped_keys`, limited to ``keys`` and the keys starting with one of
        ``prefixes`` (what choosing the keys of a few groups needs to know)."""
        found: dict[str, KeySet] = {n: {} for n in self._order}
        sids = [self._sids[n] for n in self._order]
        # CROSS JOIN: from the few keys to their mappings, never through every mapping.
        sql = (
            "SELECT si.server, i.key FROM items i CROSS JOIN server_items si "  # noqa: S608
            f"ON si.server IN ({_marks(len(sids))}) AND si.item = i.id "
        )
        for chunk in _chunks(sorted(set(keys)), _CHUNK):
            rows = await self._db().execute_fetchall(
                f"{sql} WHERE i.key IN ({_marks(len(chunk))})",
                (*sids, *chunk),
            )
            self._add_held(found, rows)
        for prefix in sorted(set(prefixes)):
            rows = await self._db().execute_fetchall(
                f"{sql} WHERE i.key >= ? AND i.key < ?",
                (*sids, prefix, prefix + "\U0010ffff"),
            )
            self._add_held(found, rows)
        return found

    def _add_held(self, found: dict[str, KeySet], rows: Iterable[Any]) -> None:
        for sid, key in rows:
            name = self._names.get(int(sid))
            if name in found:
                found[name][str(key)] = None

    async def describe(self, entries: Iterable[int]) -> dict[int, IndexedItem]:
        """Readable rows for some entries (samples for status and logs)."""
        await self.ready()
        wanted = sorted(set(entries))
        found: dict[int, IndexedItem] = {}
        for chunk in _chunks(wanted, _CHUNK):
            rows = await self._db().execute_fetchall(
                "SELECT id, server, remote_id, item_type, name, year, path, provider_ids, "  # noqa: S608
                f"season, episode FROM index_items WHERE id IN ({_marks(len(chunk))})",
                chunk,
            )
            for r in rows:
                found[int(r[0])] = _indexed(self._names[int(r[1])], r[2:])
        return found

    async def find(self, server: str, remote_ids: Iterable[str]) -> dict[str, IndexedItem]:
        """Readable rows of some of a server's items, by remote id."""
        sid = self.sid(server)
        found: dict[str, IndexedItem] = {}
        for chunk in _chunks(sorted(set(remote_ids)), _CHUNK):
            rows = await self._lookup_db().execute_fetchall(
                "SELECT remote_id, item_type, name, year, path, provider_ids, season, episode "  # noqa: S608
                f"FROM index_items WHERE server=? AND remote_id IN ({_marks(len(chunk))})",
                (sid, *chunk),
            )
            for r in rows:
                found[str(r[0])] = _indexed(server, (r[0], *r[1:]))
        return found

    # ------------------------------------------------------------------ id lookups

    async def canonical_of(self, server: str, remote_ids: Iterable[str]) -> dict[str, str]:
        """Remote id -> canonical key for the server's mapped items among ``remote_ids``."""
        sid = self.sid(server)
        found: dict[str, str] = {}
        for chunk in _chunks(sorted(set(remote_ids)), _CHUNK):
            sql = (
                "SELECT si.remote_id, i.key FROM server_items si JOIN items i ON i.id = si.item "  # noqa: S608
                f"WHERE si.server = ? AND si.remote_id IN ({_marks(len(chunk))})"
            )
            rows = await self._lookup_rows(sql, (sid, *chunk), len(chunk))
            found.update((str(r[0]), str(r[1])) for r in rows)
        return found

    async def _lookup_rows(self, sql: str, parameters: Sequence[Any], count: int) -> Iterable[Any]:
        """The rows of a lookup over ``count`` ids: read on the loop when it is small
        (:data:`QUICK_LOOKUP`) and the quick reader can answer, else on the lookup
        connection's thread."""
        quick = self._quick
        if count <= QUICK_LOOKUP and self._lookup is not None and quick is not None:
            rows = quick.rows(sql, parameters)
            if rows is not None:
                return rows
        return await self._lookup_db().execute_fetchall(sql, parameters)

    async def remote_of(self, server: str, items: Iterable[str]) -> dict[str, str]:
        """Canonical key -> the server's remote id, for the mapped ones among ``items``."""
        sid = self.sid(server)
        found: dict[str, str] = {}
        for chunk in _chunks(sorted(set(items)), _CHUNK):
            # CROSS JOIN: items first, by key. Left to itself (no statistics) SQLite walked
            # every id map row of the server instead: 20-27 ms a call at 100,000 items.
            sql = (
                "SELECT i.key, si.remote_id FROM items i CROSS JOIN server_items si "  # noqa: S608
                "ON si.item = i.id AND si.server = ? "
                f"WHERE i.key IN ({_marks(len(chunk))})"
            )
            rows = await self._lookup_rows(sql, (sid, *chunk), len(chunk))
            found.update((str(r[0]), str(r[1])) for r in rows)
        return found

    async def siblings(self, server: str, remote_ids: Iterable[str]) -> dict[str, set[str]]:
        """Remote id -> the server's other items sharing one of its provider-id keys."""
        sid = self.sid(server)
        found: dict[str, set[str]] = {}
        if not await self._any_siblings(sid):
            return found
        for chunk in _chunks(sorted(set(remote_ids)), _CHUNK):
            rows = await self._lookup_db().execute_fetchall(
                "SELECT DISTINCT ai.remote_id, bi.remote_id FROM index_items ai "  # noqa: S608
                "JOIN index_keys ka ON ka.entry = ai.id "
                "JOIN index_keys kb ON kb.server = ka.server AND kb.key = ka.key "
                "AND kb.entry != ka.entry "
                "JOIN index_items bi ON bi.id = kb.entry "
                f"WHERE ai.server = ? AND ai.remote_id IN ({_marks(len(chunk))})",
                (sid, *chunk),
            )
            for one, other in rows:
                found.setdefault(str(one), set()).add(str(other))
        return found

    async def _any_siblings(self, sid: int) -> bool:
        """Whether two items of server ``sid`` share a provider-id key (cached until a write)."""
        known = self._has_siblings.get(sid)
        if known is None:
            writes = self._writes
            rows = await self._lookup_db().execute_fetchall(
                "SELECT 1 FROM index_keys WHERE server=? GROUP BY key HAVING COUNT(*) > 1 LIMIT 1",
                (sid,),
            )
            known = bool(list(rows))
            if writes == self._writes:
                self._has_siblings[sid] = known
        return known

    async def in_index(self, server: str, remote_ids: Iterable[str]) -> set[str]:
        """The ids among ``remote_ids`` that the server's index holds."""
        sid = self.sid(server)
        found: set[str] = set()
        for chunk in _chunks(sorted(set(remote_ids)), _CHUNK):
            rows = await self._lookup_db().execute_fetchall(
                f"SELECT remote_id FROM index_items WHERE server=? AND remote_id IN ({_marks(len(chunk))})",  # noqa: S608, E501
                (sid, *chunk),
            )
            found.update(str(r[0]) for r in rows)
        return found

    # ------------------------------------------------------------------ internals

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One short write transaction on the bulk connection."""
        self._writes += 1
        self._has_siblings.clear()
        try:
            async with self._gate.transaction(self._db()) as db:
                yield db
        finally:
            self._writes += 1
            self._has_siblings.clear()

    def _db(self) -> aiosqlite.Connection:
        if self._bulk is None:
            raise LibraryIndexError("the library index is not open")
        return self._bulk

    def _lookup_db(self) -> aiosqlite.Connection:
        if self._lookup is None:
            raise LibraryIndexError("the library index is not open")
        return self._lookup

    async def _current_gen(self, sid: int) -> int:
        rows = await self._db().execute_fetchall(
            "SELECT scan FROM index_scans WHERE server=?", (sid,)
        )
        return next((int(r[0]) for r in rows), 0)

    async def _store_series(
        self, sid: int, gen: int, items: Sequence[BaseItemDto], changed: set[str] | None = None
    ) -> dict[str, dict[str, str]]:
        """Store series with their provider ids; add to ``changed`` those whose ids moved."""
        found = {i.id: dict(i.provider_ids) for i in items}
        async with self._tx() as db:
            stored: dict[str, tuple[Any, Any]] = {}
            for chunk in _chunks(list(found), _CHUNK):
                rows = await db.execute_fetchall(
                    "SELECT remote_id, name, provider_ids FROM index_series "  # noqa: S608
                    f"WHERE server=? AND remote_id IN ({_marks(len(chunk))})",
                    (sid, *chunk),
                )
                stored.update((str(r[0]), (r[1], r[2])) for r in rows)
            if changed is not None:
                changed.update(k for k, (_, ids) in stored.items() if _unjson(ids) != found.get(k))
            # A series seen again unchanged is not written (its scan stays where it was).
            await db.executemany(
                "INSERT INTO index_series(server, remote_id, name, provider_ids, scan) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(server, remote_id) DO UPDATE SET "
                "name=excluded.name, provider_ids=excluded.provider_ids, scan=excluded.scan",
                [
                    (sid, i.id, i.name, _json(found[i.id]), gen)
                    for i in items
                    if stored.get(i.id) != (i.name, _json(found[i.id]))
                ],
            )
        return found

    async def _series_ids(self, sid: int, series: Iterable[str]) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        for chunk in _chunks(sorted(series), _CHUNK):
            rows = await self._db().execute_fetchall(
                "SELECT remote_id, provider_ids FROM index_series "  # noqa: S608
                f"WHERE server=? AND remote_id IN ({_marks(len(chunk))})",
                (sid, *chunk),
            )
            found.update((str(r[0]), _unjson(r[1])) for r in rows)
        return found

    async def _rekey_series_episodes(self, sid: int, series: Mapping[str, dict[str, str]]) -> None:
        for series_id in series:
            rows = await self._db().execute_fetchall(
                "SELECT remote_id, item_type, name, year, path, provider_ids, series_id, season, "
                "episode, scan FROM index_items WHERE server=? AND series_id=?",
                (sid, series_id),
            )
            entries = [
                IndexEntry(
                    remote_id=str(r[0]),
                    item_type=str(r[1]),
                    name=r[2],
                    year=r[3],
                    path=r[4],
                    provider_ids=_unjson(r[5]),
                    series_id=r[6],
                    season=r[7],
                    episode=r[8],
                )
                for r in rows
            ]
            gen = max((int(r[9]) for r in rows), default=0)
            if entries:
                await self._store_items(sid, gen, entries, series, frozenset(series))

    async def _store_items(
        self,
        sid: int,
        gen: int,
        entries: Sequence[IndexEntry],
        series: Mapping[str, Mapping[str, str]],
        rekey: frozenset[str] = frozenset(),
        track: ScanResult | None = None,
        prepared: _Prepared | None = None,
    ) -> int:
        """Store one page of items with their provider keys, in one transaction.

        New items are inserted; items whose stored fields differ (or whose series is in
        ``rekey``: its provider ids changed) are updated and re-keyed; unchanged ones are not
        written at all, so a rescan of a stable library writes next to nothing. ``track``
        (a scan under way) notes the entries seen, and the dirty ones: new, changed, and what
        the changed ones were linked to before. ``prepared``: the rows and match keys of
        ``entries``, when the caller worked them out already. Returns how many items were new
        or changed.
        """
        if not entries:
            return 0
        if prepared is None:
            # Worked out in a worker thread (a page is 1,000 items).
            rows, keys = await asyncio.to_thread(_prepare_rows, self._rules[sid], entries, series)
        else:
            rows, keys = prepared.rows, prepared.keys
        async with self._tx() as db:
            began = time.perf_counter()
            stored: dict[str, tuple[int, tuple[Any, ...]]] = {}
            for chunk in _chunks(list(rows), _CHUNK):
                found = await db.execute_fetchall(
                    "SELECT id, remote_id, item_type, name, year, path, match_path, provider_ids, "  # noqa: S608
                    "series_id, season, episode FROM index_items "
                    f"WHERE server=? AND remote_id IN ({_marks(len(chunk))})",
                    (sid, *chunk),
                )
                stored.update((str(r[1]), (int(r[0]), tuple(r[2:]))) for r in found)
            fresh: list[IndexEntry] = []
            changed: list[tuple[IndexEntry, int]] = []
            for e in entries:
                old = stored.get(e.remote_id)
                if old is None:
                    fresh.append(e)
                elif old[1] != rows[e.remote_id] or e.series_id in rekey:
                    changed.append((e, old[0]))
            if track is not None:
                track.seen.update(h for h, _ in stored.values())
                if changed and track.dirty is not None:
                    handles_before = [h for _, h in changed]
                    track.touch([*handles_before, *await self.neighbours(handles_before)])
            if changed:
                await db.executemany(
                    "UPDATE index_items SET item_type=?, name=?, year=?, path=?, match_path=?, "
                    "provider_ids=?, series_id=?, season=?, episode=?, scan=? WHERE id=?",
                    [(*rows[e.remote_id], gen, handle) for e, handle in changed],
                )
                await db.executemany(
                    "DELETE FROM index_keys WHERE entry=?", [(h,) for _, h in changed]
                )
            handles = {e.remote_id: h for e, h in changed}
            if fresh:
                # New entries take the next ids (the transaction holds the write lock).
                top = await db.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM index_items")
                first = int(next(iter(top))[0]) + 1
                handles.update((e.remote_id, first + i) for i, e in enumerate(fresh))
            keyed = fresh + [e for e, _ in changed]

            def parameters() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
                return (
                    [
                        (handles[e.remote_id], sid, e.remote_id, *rows[e.remote_id], gen)
                        for e in fresh
                    ],
                    [(sid, key, handles[e.remote_id]) for e in keyed for key in keys[e.remote_id]],
                )

            inserts, key_rows = await asyncio.to_thread(parameters) if keyed else ([], [])
            if inserts:
                await db.executemany(
                    "INSERT INTO index_items(id, server, remote_id, item_type, name, year, path, "
                    "match_path, provider_ids, series_id, season, episode, scan) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    inserts,
                )
            if key_rows:
                await db.executemany(
                    "INSERT OR IGNORE INTO index_keys(server, key, entry) VALUES (?, ?, ?)",
                    key_rows,
                )
            if track is not None:
                new_handles = [handles[e.remote_id] for e in fresh]
                track.seen.update(new_handles)
                track.touch(new_handles)
                track.changed += len(fresh) + len(changed)
        if track is not None:
            # The commit included: that is when the pages are written.
            track.tx_s = took = time.perf_counter() - began
            if took < TX_GROW_S:
                track.tx_pages = min(TX_PAGES, track.tx_pages + 1)
            elif took > TX_SHRINK_S:
                track.tx_pages = max(1, track.tx_pages - 1)
        return len(fresh) + len(changed)

    async def _store_page(
        self,
        sid: int,
        gen: int,
        entries: Sequence[IndexEntry],
        prepared: _Prepared,
        series: Mapping[str, Mapping[str, str]],
        rekey: frozenset[str],
        track: ScanResult,
        fresh: bool,
    ) -> None:
        if fresh:
            await self._store_fresh(sid, gen, entries, prepared, track)
        else:
            await self._store_items(sid, gen, entries, series, rekey, track, prepared)

    async def _store_fresh(
        self,
        sid: int,
        gen: int,
        entries: Sequence[IndexEntry],
        prepared: _Prepared,
        track: ScanResult,
    ) -> None:
        """Append one page of a bulk scan (every item new) with its keys, in one transaction,
        in one call on SQLite's thread (``prepared``: the page's rows and keys)."""
        if not entries:
            return
        rows, keys = prepared.rows, prepared.keys

        def append(conn: sqlite3.Connection) -> int:
            top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM index_items").fetchone()
            first = int(top[0]) + 1
            conn.executemany(
                "INSERT INTO index_items(id, server, remote_id, item_type, name, year, path, "
                "match_path, provider_ids, series_id, season, episode, scan) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (first + n, sid, e.remote_id, *rows[e.remote_id], gen)
                    for n, e in enumerate(entries)
                ],
            )
            conn.executemany(
                "INSERT INTO index_keys(entry, server, key) VALUES (?, ?, ?)",
                [
                    (first + n, sid, key)
                    for n, e in enumerate(entries)
                    for key in sorted(keys[e.remote_id])
                ],
            )
            return first

        async with self._tx() as db:
            began = time.perf_counter()
            first = await run_on_thread(db, append)
        track.touch(range(first, first + len(entries)))
        track.changed += len(entries)
        track.tx_s = took = time.perf_counter() - began
        if took < TX_GROW_S:
            track.tx_pages = min(TX_PAGES, track.tx_pages + 1)
        elif took > TX_SHRINK_S:
            track.tx_pages = max(1, track.tx_pages - 1)

    async def _finish(
        self, sid: int, gen: int, wall_ms: int, result: ScanResult, fresh: bool = False
    ) -> None:
        """Drop what the scan did not see (and note it as dirty), then mark it complete.

        After a bulk scan (``fresh``) every row is the scan's own: only the mark is written.
        """
        async with self._tx() as db:
            await self._name_server(db, sid)
            if fresh:
                await self._mark_scan(db, sid, gen, wall_ms)
                return
            seen = result.seen
            handles: list[int] = []
            # Ids only, a slice at a time: the whole server's rows are never held at once.
            async with db.execute(
                "SELECT id FROM index_items WHERE server=? AND scan<?", (sid, gen)
            ) as cursor:
                while rows := await cursor.fetchmany(20_000):
                    handles.extend(h for (h,) in rows if h not in seen)
            gone: list[tuple[int, str]] = []
            for chunk in _chunks(handles, _CHUNK):
                found = await db.execute_fetchall(
                    f"SELECT id, remote_id FROM index_items WHERE id IN ({_marks(len(chunk))})",  # noqa: S608
                    chunk,
                )
                gone.extend((int(r[0]), str(r[1])) for r in found)
            if len(gone) > DIRTY_LIMIT:
                result.dirty = None
            elif gone and result.dirty is not None:
                result.touch([*handles, *await self.neighbours(handles)])
            for chunk in _chunks(handles, _CHUNK):
                marks = _marks(len(chunk))
                await db.execute(f"DELETE FROM index_keys WHERE entry IN ({marks})", chunk)  # noqa: S608
                await db.execute(f"DELETE FROM index_items WHERE id IN ({marks})", chunk)  # noqa: S608
            result.removed = len(gone)
            result.gone = {r for _, r in gone}
            rows = await db.execute_fetchall(
                "SELECT remote_id FROM index_series WHERE server=? AND scan<?", (sid, gen)
            )
            series_gone = [str(r[0]) for r in rows if str(r[0]) not in result.seen_series]
            for chunk in _chunks(series_gone, _CHUNK):
                await db.execute(
                    "DELETE FROM index_series "  # noqa: S608
                    f"WHERE server=? AND remote_id IN ({_marks(len(chunk))})",
                    (sid, *chunk),
                )
            await self._mark_scan(db, sid, gen, wall_ms)

    async def _mark_scan(self, db: aiosqlite.Connection, sid: int, gen: int, wall_ms: int) -> None:
        await db.execute(
            "INSERT INTO index_scans(server, scan, complete_ms, rewrites) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(server) DO UPDATE SET scan=excluded.scan, "
            "complete_ms=excluded.complete_ms, rewrites=excluded.rewrites",
            (sid, gen, wall_ms, _rewrites_text(self._servers[self._names[sid]])),
        )

    async def _check_rewrites(self, server: str) -> None:
        """Recompute stored match paths when the server's rewrites changed since the scan."""
        sid = self._sids[server]
        db = self._db()
        rows = await db.execute_fetchall("SELECT rewrites FROM index_scans WHERE server=?", (sid,))
        text = _rewrites_text(self._servers[server])
        if not rows or rows[0][0] == text:  # type: ignore[index]
            return
        rewrites = self._servers[server].path_rewrites
        items = await db.execute_fetchall("SELECT id, path FROM index_items WHERE server=?", (sid,))
        async with self._tx() as db:
            await db.executemany(
                "UPDATE index_items SET match_path=? WHERE id=?",
                [(match_path(rewrites, r[1]), int(r[0])) for r in items],
            )
            await db.execute("UPDATE index_scans SET rewrites=? WHERE server=?", (text, sid))
        logger.info("[%s] path rewrites changed; match paths recomputed", server)


#: Items parsed, and their rows worked out, between two turns of the event loop in a scan.
_SLICE = 250


@dataclass(slots=True)
class _Prepared:
    """The rows and match keys of a page's items (see :func:`_prepare_rows`), added a slice
    at a time as the items come."""

    rows: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    keys: dict[str, set[str]] = field(default_factory=dict)

    def add(
        self,
        rules: Sequence[tuple[str, str]],
        entries: Sequence[IndexEntry],
        series: Mapping[str, Mapping[str, str]],
    ) -> None:
        """Work out the rows and keys of ``entries`` too."""
        if entries:
            rows, keys = _prepare_rows(rules, entries, series)
            self.rows.update(rows)
            self.keys.update(keys)


def _prepare_rows(
    rules: Sequence[tuple[str, str]],
    entries: Sequence[IndexEntry],
    series: Mapping[str, Mapping[str, str]],
) -> tuple[dict[str, tuple[Any, ...]], dict[str, set[str]]]:
    """Per remote id: the ``index_items`` columns after ``remote_id`` (``scan`` aside) as
    stored, and the provider-id match keys."""
    rows = {
        e.remote_id: (
            e.item_type,
            e.name,
            e.year,
            e.path,
            _match_path(rules, e.path),
            _json(e.provider_ids),
            e.series_id,
            e.season,
            e.episode,
        )
        for e in entries
    }
    keys = {e.remote_id: provider_keys(e, series.get(e.series_id or "")) for e in entries}
    return rows, keys


def entry_table(
    rows: Iterable[tuple[int, int]], count: int, low: int, top: int, sids: Iterable[int]
) -> bytearray | dict[int, int]:
    """(entry, server id) ``rows`` as :meth:`LibraryIndex.entry_server_table` returns them:
    ``count`` rows of entries from ``low`` to ``top``, of the servers ``sids``. A table holding
    the server id plus one at each entry (0: none) when it stays within four bytes an entry
    (plus a megabyte) and the server ids fit a byte; a dict otherwise."""
    if not count:
        return bytearray()
    if low < 0 or top > 4 * count + 1_000_000 or any(not 0 <= s < 255 for s in sids):
        return {int(entry): int(sid) for entry, sid in rows}
    table = bytearray(top + 1)
    for entry, sid in rows:
        table[entry] = sid + 1
    return table


def _indexed(server: str, r: Sequence[Any]) -> IndexedItem:
    """Build an IndexedItem from (remote_id, type, name, year, path, provider_ids, season, ep)."""
    return IndexedItem(
        server=server,
        remote_id=str(r[0]),
        item_type=str(r[1]),
        name=None if r[2] is None else str(r[2]),
        year=None if r[3] is None else int(r[3]),
        path=None if r[4] is None else str(r[4]),
        provider_ids=_unjson(r[5]),
        season=None if r[6] is None else int(r[6]),
        episode=None if r[7] is None else int(r[7]),
    )


def _json(value: Mapping[str, str]) -> str | None:
    return json.dumps(value) if value else None


def _unjson(text: object) -> dict[str, str]:
    if not text:
        return {}
    value = json.loads(str(text))
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _int_pairs(rows: Iterable[Any]) -> list[tuple[int, int]]:
    """Rows of two INTEGER columns as they come (tuples of ints: nothing to convert, which
    matters for the hundreds of thousands of rows the matcher reads)."""
    return cast(list[tuple[int, int]], rows if isinstance(rows, list) else list(rows))


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _chunks(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
