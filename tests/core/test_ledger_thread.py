"""One hop per transaction: every ledger call runs as ONE call on SQLite's thread, whole.

What an operator would notice: a stop that cancels a caller mid-transaction leaves the ledger
either with all of that transaction or none of it, and the next transaction works; a statement
or a COMMIT that fails rolls everything back and the ledger answers from the file, not from
what it had decoded; and the wrapper around aiosqlite's private "run this on your thread" still
works with the aiosqlite installed (an upgrade that changes it fails here, not in production).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from jfsync.model import DEFAULT_USER_DATA, Register, UserData
from jfsync.sync.ledger import Ledger, Observation, Outcome
from jfsync.sync.ledger.cache import StateCache
from jfsync.sync.ledger.schema import connect, run_on_thread, write_transaction
from jfsync.sync.merge import MergePolicy
from tests.support.waiting import bound, wait_until

SERVERS = ("a", "b", "c")
POLICY = MergePolicy(servers=SERVERS)
USER = "alice"
ITEM = "9f86d081884c7d659a2feaa0c55ad015"
T0 = 1_750_000_000_000
FAV = Register.FAVORITE
RAT = Register.RATING


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger(tmp_path / "ledger.db", POLICY).open()
    try:
        for server in SERVERS:
            await opened.map_user(server, f"{server}-uid", USER)
        for offset, server in enumerate(SERVERS):  # every server has history: no first contact
            await opened.apply_observation(
                server, USER, ITEM, DEFAULT_USER_DATA, T0 + offset, source="scan"
            )
        yield opened
        assert await opened.check_invariants() == []
    finally:
        await opened.close()


def other_connection(path: Path) -> sqlite3.Connection:
    """A second connection to the ledger file, as another process (or an operator) has."""
    return sqlite3.connect(path, isolation_level=None)


def file_state(path: Path) -> tuple[list[Any], list[Any], list[Any]]:
    """The canonical, last-known and outbox rows of the file, read past the ledger."""
    with other_connection(path) as db:
        return (
            db.execute("SELECT favorite, rating FROM canonical").fetchall(),
            db.execute(
                "SELECT server, favorite, rating FROM last_known ORDER BY server"
            ).fetchall(),
            db.execute("SELECT peer, registers FROM outbox ORDER BY peer").fetchall(),
        )


# ---------------------------------------------------------------------- the aiosqlite wrapper


async def test_run_on_thread_runs_the_call_on_the_connections_thread_with_its_connection(
    tmp_path: Path,
) -> None:
    """aiosqlite offers no public 'run this callable'; run_on_thread uses its private
    Connection._execute and Connection._conn. This fails if an upgrade changes either."""
    db = await connect(str(tmp_path / "plain.db"))
    try:
        seen: list[tuple[int, sqlite3.Connection]] = []

        def begin(conn: sqlite3.Connection) -> int:
            seen.append((threading.get_ident(), conn))
            conn.execute("BEGIN")
            return int(conn.execute("SELECT 41 + 1").fetchone()[0])

        assert await run_on_thread(db, begin) == 42
        [(ident, conn)] = seen
        assert ident != threading.get_ident()  # not the event loop's thread
        assert isinstance(conn, sqlite3.Connection)
        assert db.in_transaction  # the very connection aiosqlite itself uses
        await db.rollback()

        def fail(conn: sqlite3.Connection) -> None:
            seen.append((threading.get_ident(), conn))
            conn.execute("SELECT * FROM no_such_table")

        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            await run_on_thread(db, fail)
        assert seen[1] == (ident, conn)  # the same worker thread, in order
    finally:
        await db.close()


async def test_a_cancelled_caller_gets_control_back_only_once_the_call_ended(
    tmp_path: Path,
) -> None:
    db = await connect(str(tmp_path / "plain.db"))
    started, release = threading.Event(), threading.Event()
    ended: list[str] = []

    def slow(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(bound(10))
        ended.append("ended")

    try:
        caller = asyncio.create_task(run_on_thread(db, slow))
        await wait_until(started.is_set)
        caller.cancel()
        for _ in range(20):  # loop turns only: the cancellation has been delivered
            await asyncio.sleep(0)
        assert not caller.done()  # still waiting for the call on SQLite's thread
        caller.cancel()  # a second cancellation does not cut the wait short either
        for _ in range(20):
            await asyncio.sleep(0)
        assert not caller.done()
        release.set()
        async with asyncio.timeout(bound(10)):
            with pytest.raises(asyncio.CancelledError):
                await caller
        assert ended == ["ended"]
    finally:
        release.set()
        await db.close()


async def test_write_transaction_rolls_back_whatever_fails_inside_it(tmp_path: Path) -> None:
    db = await connect(str(tmp_path / "plain.db"))
    try:
        await db.execute("CREATE TABLE t (v INTEGER)")

        def half_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("the apply logic failed half-way")

        with pytest.raises(RuntimeError, match="half-way"):
            await run_on_thread(db, lambda conn: write_transaction(conn, half_then_fail))
        assert not db.in_transaction
        assert list(await db.execute_fetchall("SELECT v FROM t")) == []
        await run_on_thread(
            db,
            lambda conn: write_transaction(conn, lambda c: c.execute("INSERT INTO t VALUES (2)")),
        )
        assert [tuple(r) for r in await db.execute_fetchall("SELECT v FROM t")] == [(2,)]
    finally:
        await db.close()


# ---------------------------------------------------------------------- one hop each


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call queued on any aiosqlite connection's thread, by function name."""
    queued: list[str] = []
    execute = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
        queued.append(getattr(fn, "__name__", type(fn).__name__))
        return await execute(self, fn, *args)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return queued


async def test_each_ledger_transaction_and_read_is_one_hop(ledger: Ledger, hops: list[str]) -> None:
    observations = [
        Observation("a", USER, f"{i:032x}", UserData(favorite=True), T0 + 100 + i)
        for i in range(50)
    ]
    applied = await ledger.apply_observations(observations)
    assert all(a.outcome is Outcome.CHANGED for a in applied)
    assert len(hops) == 1, hops

    hops.clear()
    rows = await ledger.due_rows("b", 100, T0 + 200)
    assert len(rows) == 50
    assert len(hops) == 1

    hops.clear()
    fresh = await ledger.observe_before_writes(
        [(r, DEFAULT_USER_DATA) for r in rows],
        T0 + 210,
        intents=lambda row, current: [row.intended(current)],
    )
    assert len(hops) == 1

    hops.clear()
    acks = [(r, r.intended(DEFAULT_USER_DATA)) for r in fresh if r is not None]
    assert all(await ledger.rows_written(acks, T0 + 220))
    assert len(hops) == 1

    for read in (
        lambda: ledger.outbox_depth("b"),
        lambda: ledger.canonical(USER, ITEM),
        lambda: ledger.dead_summary("b", 10),
        lambda: ledger.oldest_age("c", T0 + 300),
    ):
        hops.clear()
        await read()
        assert len(hops) == 1
    assert await ledger.outbox_depth("b") == 0


# ---------------------------------------------------------------------- whole or nothing


async def test_a_transaction_cancelled_mid_way_is_whole_and_the_next_one_works(
    ledger: Ledger, tmp_path: Path
) -> None:
    """A stop cancels the caller while its transaction is half-way through its statements on
    SQLite's thread: the transaction still ends as one unit (here it commits, all of it), the
    caller hears of the cancellation only then, and the ledger knows what the file holds."""
    reached, release = threading.Event(), threading.Event()
    armed = False

    def pause() -> int:
        if armed:
            reached.set()
            release.wait(bound(10))
        return 0

    db = ledger._db  # the test reaches in to pause SQLite mid-statement; nothing public offers it
    assert db is not None
    await run_on_thread(db, lambda conn: conn.set_progress_handler(pause, 50))
    armed = True
    cancelled = asyncio.create_task(
        ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    )
    try:
        await wait_until(reached.is_set)
        assert db.in_transaction  # paused inside it, between BEGIN and COMMIT
        cancelled.cancel()
        after = asyncio.create_task(
            ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=3.0), T0 + 120)
        )
        for _ in range(20):  # loop turns only: both tasks wait (one on the thread, one its turn)
            await asyncio.sleep(0)
        assert not cancelled.done()
        assert not after.done()
    finally:
        armed = False
        release.set()
    async with asyncio.timeout(bound(10)):
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        applied = await after
    await run_on_thread(db, lambda conn: conn.set_progress_handler(None, 0))

    # The favourite committed whole (so the next change is only the rating) ...
    assert applied.outcome is Outcome.CHANGED
    assert applied.changed == {RAT}
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == UserData(favorite=True, rating=3.0)
    # ... and both peers are owed both, once.
    for peer in ("b", "c"):
        [row] = await ledger.due_rows(peer, 10, T0 + 130)
        assert row.registers == {FAV, RAT}
    canon, known, rows = file_state(tmp_path / "ledger.db")
    assert canon == [(1, 3.0)]
    assert known == [(1, 1, 3.0), (2, 0, None), (3, 0, None)]
    assert rows == [(2, 3), (3, 3)]


async def test_a_failing_statement_rolls_back_everything_and_the_ledger_answers_from_the_file(
    ledger: Ledger, tmp_path: Path
) -> None:
    """The outbox insert fails after the canonical and last-known states were written in the
    same transaction: none of it stays, in the file or in what the ledger answers."""
    path = tmp_path / "ledger.db"
    before = file_state(path)
    with other_connection(path) as admin:
        admin.execute(
            "CREATE TRIGGER refuse_rows BEFORE INSERT ON outbox "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    with pytest.raises(sqlite3.IntegrityError, match="disk is full"):
        await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)

    assert file_state(path) == before
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == DEFAULT_USER_DATA
    assert await ledger.last_known("a", USER, ITEM) == DEFAULT_USER_DATA
    assert await ledger.due_rows("b", 10, T0 + 110) == []

    # The disk has room again: the same change seen again is a change, queued for the peers.
    with other_connection(path) as admin:
        admin.execute("DROP TRIGGER refuse_rows")
    again = await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 120)
    assert again.outcome is Outcome.CHANGED
    assert [r.registers for r in await ledger.due_rows("b", 10, T0 + 130)] == [{FAV}]


async def test_a_commit_that_fails_rolls_back_and_the_next_transaction_works(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Every statement succeeds but COMMIT itself fails (a deferred constraint): the
    transaction is rolled back on SQLite's thread, the connection is idle again, and the
    ledger forgets nothing it had not been told by the file."""
    path = tmp_path / "ledger.db"
    before = file_state(path)
    with other_connection(path) as admin:
        admin.execute(
            "CREATE TABLE refuse_commit (item INTEGER "
            "REFERENCES items(id) DEFERRABLE INITIALLY DEFERRED)"
        )
        admin.execute(
            "CREATE TRIGGER refuse_commit_on_rows AFTER INSERT ON outbox "
            "BEGIN INSERT INTO refuse_commit VALUES (-1); END"
        )
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    assert file_state(path) == before
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == DEFAULT_USER_DATA

    with other_connection(path) as admin:
        admin.execute("DROP TRIGGER refuse_commit_on_rows")
        admin.execute("DROP TABLE refuse_commit")
    again = await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 120)
    assert again.outcome is Outcome.CHANGED
    assert [r.registers for r in await ledger.due_rows("c", 10, T0 + 130)] == [{FAV}]


# ---------------------------------------------------------------------- the state cache


async def test_the_cache_takes_a_burst_on_sqlites_thread_not_on_the_event_loop(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2,000-entry message: the state cache takes its ~6,000 fresh objects on SQLite's
    thread right after COMMIT (still under the ledger's gate lock), so the event loop does
    not stall on it; and what it took is what the file holds."""
    threads: list[int] = []
    committed = StateCache.committed

    def record(self: StateCache, *args: Any) -> None:
        threads.append(threading.get_ident())
        committed(self, *args)

    monkeypatch.setattr(StateCache, "committed", record)
    observations = [
        Observation("a", USER, f"{i:032x}", UserData(favorite=True), T0 + 100 + i)
        for i in range(2_000)
    ]
    applied = await ledger.apply_observations(observations)
    assert all(a.outcome is Outcome.CHANGED for a in applied)
    assert threads
    assert threading.get_ident() not in threads
    assert await ledger.outbox_depth("b") == 2_000
    canonical = await ledger.canonical(USER, f"{1_999:032x}")  # from the cache
    assert canonical is not None
    assert canonical.data == UserData(favorite=True)
