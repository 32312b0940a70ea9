"""The ledger's WAL is copied back into the file off the live path, and never grows unbounded.

What an operator would notice: the ``<ledger>-wal`` file stays about as large as what one
burst of writes puts in it, however long jfsync runs, instead of SQLite checkpointing inside
whichever commit crossed 1,000 pages (a live event's apply waited for that); a reader holding
an old snapshot only delays the copy, which completes once it is gone; and closing the ledger
ends the checkpointer's thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jfsync.model import PlayState, UserData
from jfsync.sync.ledger import Ledger, Observation
from jfsync.sync.ledger.lock import WalCheckpointer
from jfsync.sync.merge import MergePolicy
from tests.support.waiting import wait_until

SERVERS = ("a", "b")
POLICY = MergePolicy(servers=SERVERS)
USER = "alice"
T0 = 1_750_000_000_000
#: Items each transaction of the tests records (a catch-up's slice is 250).
PER_TX = 250


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger(tmp_path / "ledger.db", POLICY).open()
    try:
        for server in SERVERS:
            await opened.map_user(server, f"{server}-uid", USER)
        yield opened
    finally:
        await opened.close()


def checkpointer(ledger: Ledger) -> WalCheckpointer:
    found = ledger._file.checkpointer
    assert found is not None
    return found


async def record_played(ledger: Ledger, round_: int) -> None:
    """One transaction: the user played ``PER_TX`` new items on server a."""
    await ledger.apply_observations(
        [
            Observation(
                "a",
                USER,
                f"{round_:08x}{n:024x}",
                UserData(play_state=PlayState(True, 1 + n % 3, 1_700_000_000 + n, 0)),
                T0 + round_,
                "scan",
            )
            for n in range(PER_TX)
        ]
    )


async def copied_after(ckpt: WalCheckpointer, before: int) -> tuple[int, int]:
    """Wait for a checkpoint after ``before`` that found every frame of the WAL copied."""

    def done() -> bool:
        last = ckpt.last
        return ckpt.checkpoints > before and last is not None and last[0] == last[1]

    await wait_until(done)
    assert ckpt.last is not None
    return ckpt.last


async def test_the_wal_stays_the_size_of_one_burst_however_much_is_written(
    ledger: Ledger, tmp_path: Path
) -> None:
    ckpt = checkpointer(ledger)
    wal = tmp_path / "ledger.db-wal"
    written = 0
    largest = 0
    for round_ in range(12):
        before = ckpt.checkpoints
        await record_played(ledger, round_)
        pages, _ = await copied_after(ckpt, before)
        written += pages
        largest = max(largest, pages)
    page_size = 4096
    # SQLite appends to the WAL from its start again once everything in it was copied, so
    # the file never holds much more than one transaction's pages, while a dozen of them
    # went through it (SQLite's own automatic checkpoint would have let it reach 1,000).
    assert written >= 6 * largest
    assert wal.stat().st_size <= 2 * (largest + 8) * (page_size + 24)
    # Everything written is in the ledger (read back through it and straight from the file).
    assert len(await ledger.last_known_for_user("a", USER)) == 12 * PER_TX


async def test_a_reader_holding_an_old_snapshot_only_delays_the_copy(
    ledger: Ledger, tmp_path: Path
) -> None:
    ckpt = checkpointer(ledger)
    await record_played(ledger, 0)
    await copied_after(ckpt, 0)
    reader = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        (before_count,) = reader.execute("SELECT count(*) FROM last_known").fetchone()
        before = ckpt.checkpoints
        await record_played(ledger, 1)
        # The checkpoint cannot copy the frames the reader's snapshot does not see...
        await wait_until(
            lambda: (
                ckpt.checkpoints > before and ckpt.last is not None and ckpt.last[1] < ckpt.last[0]
            )
        )
        assert reader.execute("SELECT count(*) FROM last_known").fetchone() == (before_count,)
        blocked = ckpt.checkpoints
        reader.execute("COMMIT")
        # ...and it tries again until it could, without another write to wake it.
        await copied_after(ckpt, blocked)
    finally:
        reader.close()
    assert len(await ledger.last_known_for_user("a", USER)) == 2 * PER_TX


async def test_closing_the_ledger_ends_the_checkpointer(tmp_path: Path) -> None:
    ledger = await Ledger(tmp_path / "ledger.db", POLICY).open()
    await ledger.map_user("a", "a-uid", USER)
    names = [t.name for t in threading.enumerate()]
    assert any(name.startswith("jfsync-ledger-checkpoint") for name in names)
    await ledger.close()
    names = [t.name for t in threading.enumerate()]
    assert not any(name.startswith("jfsync-ledger-checkpoint") for name in names)
    # Closed, the file holds everything: SQLite's last connection folded the WAL in.
    assert not (tmp_path / "ledger.db-wal").exists()
    reopened = await Ledger(tmp_path / "ledger.db", POLICY).open()
    try:
        assert await reopened.user_for("a", "a-uid") == USER
    finally:
        await reopened.close()


async def test_an_in_memory_ledger_has_no_checkpointer() -> None:
    ledger = await Ledger(":memory:", POLICY).open()
    try:
        assert ledger._file.checkpointer is None
        await ledger.map_user("a", "a-uid", USER)
    finally:
        await ledger.close()
