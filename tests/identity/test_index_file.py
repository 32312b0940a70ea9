"""The library index lives in a file of its own, built in bulk, and an unfinished one is never used.

A first build fills ``<ledger>.index`` without its indexes and without a journal, and marks the
file complete only at the end. Here jfsync is cut off in the middle of that build (the files
left on disk are what a crash leaves): at the next start the index is built again, every item
is matched exactly as a clean build matches it, and favourites flow. A torn file is rebuilt the
same way; a file that is not a jfsync index is refused and left alone. An upgrade from the
ledger that held the index keeps the user's state and queued writes and builds the index file.
The matching after a bulk build is the one a page-by-page build into the indexed tables gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from jfsync.errors import UnreachableError
from jfsync.model import UserData
from jfsync.service import SyncService
from jfsync.sync.identity import IndexedIdentity
from jfsync.sync.index import LibraryIndex, LibraryIndexError, index_path
from jfsync.sync.ledger import Ledger
from jfsync.sync.ledger.schema import LATEST_VERSION, MIGRATIONS
from jfsync.sync.merge import MergePolicy
from jfsync.timing import SystemClock
from tests.identity.conftest import WAIT_S, MakeStack, Stack, emulator
from tests.identity.test_incremental import REWRITES, _counts, _settles_like_scratch

pytestmark = pytest.mark.timeout(60)

INDEX_TABLES = {"index_items", "index_series", "index_keys", "index_scans"}


def _servers(*, provider_c: bool = True) -> list[Any]:
    return [
        emulator("a", root="/mnt/a"),
        emulator("b", root="/srv/b"),
        emulator("c", root="/opt/c", provider_ids=provider_c),
    ]


def _state_of(path: str) -> str | None:
    """The build mark of an index file as it is on disk (None: no mark yet)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT value FROM index_meta WHERE key='state'").fetchall()
    finally:
        db.close()
    return str(rows[0][0]) if rows else None


def _files(ledger: Path) -> list[Path]:
    index = Path(index_path(ledger))
    return [ledger, Path(f"{ledger}-wal"), index, Path(f"{index}-journal"), Path(f"{index}-wal")]


def _on_disk(ledger: Path) -> dict[Path, bytes]:
    """The ledger's and the index's files as they are on disk now (what a crash leaves)."""
    return {path: path.read_bytes() for path in _files(ledger) if path.exists()}


def _put_back(ledger: Path, left: dict[Path, bytes]) -> None:
    """Leave on disk exactly ``left`` (shared-memory files go: a restart rebuilds them)."""
    index = index_path(ledger)
    for path in [*_files(ledger), Path(f"{ledger}-shm"), Path(f"{index}-shm")]:
        path.unlink(missing_ok=True)
    for path, content in left.items():
        path.write_bytes(content)


def _tear(index: Path) -> None:
    """Half-written pages where the index file was (no SQLite header left)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"\x00\x17 torn" * 700)


def _rows(ledger: Path, tables: Iterable[str]) -> dict[str, list[Any]]:
    with contextlib.closing(sqlite3.connect(ledger)) as raw:
        return {table: sorted(raw.execute(f"SELECT * FROM {table}").fetchall()) for table in tables}


def _tables(ledger: Path) -> tuple[int, set[str]]:
    with contextlib.closing(sqlite3.connect(ledger)) as raw:
        version = int(raw.execute("PRAGMA user_version").fetchone()[0])
        found = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return version, found


def _as_schema_3(ledger: Path) -> None:
    """Turn the ledger into what the previous jfsync left: schema 3 with the index tables
    (and a row of them) inside it, and no index file."""
    for path in _files(ledger)[2:]:
        path.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(ledger, isolation_level=None)) as raw:
        raw.execute("BEGIN")
        for statement in MIGRATIONS[1].statements:
            raw.execute(statement)
        raw.execute(
            "INSERT INTO index_items(server, remote_id, item_type, scan) VALUES (1, 'x', 'Movie', 1)"
        )
        raw.execute("PRAGMA user_version = 3")
        raw.execute("COMMIT")


def _foreign_file(path: str) -> bytes:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("CREATE TABLE photos (name TEXT)")
        db.execute("INSERT INTO photos VALUES ('holiday.jpg')")
    return Path(path).read_bytes()


async def test_a_build_cut_short_is_built_again_and_matches_like_a_clean_one(
    make_stack: MakeStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paused = asyncio.Event()
    release = asyncio.Event()

    async def on_page(server: str, items_so_far: int) -> None:
        if server == "b" and not release.is_set():
            paused.set()
            await release.wait()

    def held(service: SyncService) -> IndexedIdentity:
        return IndexedIdentity(
            service.config, service.ledger, service.clock, page_size=5, on_page=on_page
        )

    stack = await make_stack(_servers(), rewrites=REWRITES, start=False)
    await stack.start_service(identity=held, connect=False)
    async with asyncio.timeout(WAIT_S):
        await paused.wait()
    # b's first build is half done: what a crash now leaves on disk.
    ledger = Path(stack.config.ledger)
    index = index_path(ledger)
    assert _state_of(index) == "building"
    left = _on_disk(ledger)
    release.set()
    await stack.stop_service()
    _put_back(ledger, left)

    caplog.set_level(logging.WARNING, logger="jfsync.sync.index")
    await stack.start_service()
    identity = stack.svc().identity
    assert isinstance(identity, IndexedIdentity)
    await stack.wait(lambda: stack.pair_status("a", "b")["matched"] == 24)
    assert "was not completed" in caplog.text
    assert identity.index.state == "ready"
    assert _state_of(index) == "ready"
    await _settles_like_scratch(stack, tmp_path / "scratch.db")

    x_a, x_b = next((x.id, y.id) for x, y in stack.pairs("a", "b"))
    stack.change("a", x_a, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", x_b, UserData(favorite=True)))


async def test_a_torn_index_file_is_built_again(
    make_stack: MakeStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(_servers(), rewrites=REWRITES)
    await stack.wait(lambda: stack.pair_status("a", "b")["matched"] == 24)
    await stack.stop_service()
    _tear(Path(index_path(stack.config.ledger)))

    caplog.set_level(logging.WARNING, logger="jfsync.sync.index")
    await stack.start_service()
    await stack.wait(lambda: stack.pair_status("a", "b")["matched"] == 24)
    assert "cannot be read" in caplog.text
    await _settles_like_scratch(stack, tmp_path / "scratch.db")
    x_b, x_c = next((x.id, y.id) for x, y in stack.pairs("b", "c"))
    stack.change("c", x_c, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", x_b, UserData(favorite=True)))


async def test_a_file_that_is_not_an_index_is_refused_and_left_alone(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(_servers(), rewrites=REWRITES, start=False)
    ledger = Path(stack.config.ledger)
    async with Ledger(ledger, MergePolicy.from_config(stack.config)):
        pass
    other = index_path(ledger)
    before = _foreign_file(other)
    async with Ledger(ledger, MergePolicy.from_config(stack.config)):
        index = LibraryIndex(ledger, stack.config.servers)
        with pytest.raises(LibraryIndexError, match=r"not one: it holds tables photos.*move it"):
            await index.open()
        await index.close()
    assert _on_disk(ledger)[Path(other)] == before


async def test_an_upgrade_keeps_the_ledger_and_builds_the_index_file(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack(_servers(), rewrites=REWRITES)
    await stack.wait(lambda: stack.pair_status("a", "b")["matched"] == 24)
    (x_a, x_b), (y_a, _) = [(x.id, y.id) for x, y in stack.pairs("a", "b")][:2]
    stack.change("a", x_a, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", x_b, UserData(favorite=True)))
    # b refuses writes for now: the next change waits in the outbox across the upgrade.
    stack.emus["b"].fail_next_writes(1_000_000)
    stack.change("a", y_a, rating=6.0)
    await stack.wait(lambda: stack.emus["b"].fail_writes_left < 1_000_000)
    await stack.stop_service()

    # The ledger as the previous jfsync left it: schema 3, the index tables inside it.
    ledger = Path(stack.config.ledger)
    _as_schema_3(ledger)
    user_tables = ("canonical", "last_known", "outbox", "server_items", "items", "users")
    kept = _rows(ledger, user_tables)
    assert kept["outbox"], "the refused write is queued"

    async with Ledger(ledger, MergePolicy.from_config(stack.config)):
        pass
    version, tables = _tables(ledger)
    assert version == LATEST_VERSION
    assert not tables & INDEX_TABLES
    assert _rows(ledger, user_tables) == kept

    stack.emus["b"].fail_next_writes(0)
    await stack.start_service()
    await stack.wait(lambda: stack.pair_status("a", "b")["matched"] == 24)
    assert _state_of(index_path(ledger)) == "ready"
    await _settles_like_scratch(stack, tmp_path / "scratch.db")
    # The refused write is still owed to b (retried once its backoff ends), and changes flow.
    assert await stack.svc().ledger.outbox_depth("b") == 1
    assert stack.holds("b", x_b, UserData(favorite=True))
    (z_a, z_b), (_, z_c) = stack.pairs("a", "b")[3], stack.pairs("a", "c")[3]
    stack.change("c", z_c.id, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", z_b.id, UserData(favorite=True)))
    await stack.wait(lambda: stack.holds("a", z_a.id, UserData(favorite=True)))


async def _build(stack: Stack, path: Path, *, bulk: bool) -> tuple[Any, ...]:
    """Index the stack's servers into a new ledger, in bulk or page by page into the indexed
    tables (an empty file completed first, as a server added later is scanned), and match."""
    config = stack.config.model_copy(update={"ledger": path})
    clients = {name: link.client for name, link in stack.svc().links.items()}
    states: dict[str, set[str]] = {}
    built: list[IndexedIdentity] = []

    async def on_page(server: str, items_so_far: int) -> None:
        states.setdefault(server, set()).add(built[0].index.state)

    async with Ledger(config.ledger, MergePolicy.from_config(config)) as ledger:
        identity = IndexedIdentity(config, ledger, SystemClock(), page_size=7, on_page=on_page)
        built.append(identity)
        await identity.start(clients)
        try:
            assert identity.index.state == "building"
            if not bulk:
                await identity.index.ready()
            await identity.refresh()
            assert identity.index.state == "ready"
            # In bulk, every server's first scan (one after another) filled the file before
            # its indexes were made; page by page, every scan wrote into the indexed tables.
            expected = "building" if bulk else "ready"
            assert states == {name: {expected} for name in stack.emus}
            index = identity.index
            rows = {
                name: await index.find(name, [i.id for i in emu.leaf_items()])
                for name, emu in stack.emus.items()
            }
            siblings = {
                name: await index.siblings(name, [i.id for i in emu.leaf_items()])
                for name, emu in stack.emus.items()
            }
            canonical = {
                name: await index.canonical_of(name, [i.id for i in emu.leaf_items()])
                for name, emu in stack.emus.items()
            }
            return canonical, _counts(identity.status()), rows, siblings
        finally:
            await identity.close()


async def test_a_bulk_build_matches_exactly_as_a_page_by_page_build(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack(_servers(provider_c=False), rewrites=REWRITES)
    # Two versions of one film on a share a provider id (siblings), and b has one of them.
    ids = {"Tmdb": "990001"}
    stack.emus["a"].add_item("Movie", "Long Road", year=2018, provider_ids=ids)
    stack.emus["a"].add_item("Movie", "Long Road Director's Cut", year=2018, provider_ids=ids)
    stack.emus["b"].add_item("Movie", "Long Road", year=2018, provider_ids=ids)
    bulk = await _build(stack, tmp_path / "bulk.db", bulk=True)
    paged = await _build(stack, tmp_path / "paged.db", bulk=False)
    assert bulk == paged
    assert bulk[1][0]["matched"] >= 24
    assert any(bulk[3]["a"].values())


async def test_a_first_scan_that_fails_half_way_leaves_nothing_half_done(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    failed: list[int] = []

    async def on_page(server: str, items_so_far: int) -> None:
        if server == "b" and not failed:
            failed.append(items_so_far)
            raise UnreachableError("b", "connection reset in the middle of the library")

    def flaky(service: SyncService) -> IndexedIdentity:
        return IndexedIdentity(
            service.config, service.ledger, service.clock, page_size=5, on_page=on_page
        )

    stack = await make_stack(_servers(), rewrites=REWRITES, start=False)
    await stack.start_service(identity=flaky)
    # b's first scan broke after one page; its later scan read the whole library.
    await stack.wait(lambda: stack.pair_status("a", "b")["matched"] == 24)
    assert failed == [5]
    await _settles_like_scratch(stack, tmp_path / "scratch.db")
    identity = stack.svc().identity
    assert isinstance(identity, IndexedIdentity)
    assert (await identity.index.counts())["b"] == 24
    x_b, x_c = next((x.id, y.id) for x, y in stack.pairs("b", "c"))
    stack.change("b", x_b, is_favorite=True)
    await stack.wait(lambda: stack.holds("c", x_c, UserData(favorite=True)))
