"""The ledger's WAL is copied back into the file off the live path, and never grows unbounded.

What an operator would notice: the ``<ledger>-wal`` file stays about as large as the
checkpoint threshold plus one burst of writes, however long jfsync runs and whether or not
writes ever pause (SQLite no longer checkpoints inside whichever commit crossed 1,000 pages:
a live event's apply waited for that); what is left under the threshold is copied once writes
pause; a reader holding an old snapshot only delays the copy; closing the ledger ends the
checkpointer's thread. The checkpointer's pacing is real time on a thread of its own; the
tests shorten it and wait on what it did, never for time to pass.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jfsync.model import PlayState, UserData
from jfsync.sync.ledger import Ledger, Observation, store
from jfsync.sync.ledger.lock import WalCheckpointer
from jfsync.sync.merge import MergePolicy
from tests.support.waiting import wait_until

SERVERS = ("a", "b")
POLICY = MergePolicy(servers=SERVERS)
USER = "alice"
T0 = 1_750_000_000_000
#: Items each transaction of the tests records (a catch-up's slice is 250).
PER_TX = 250
#: SQLite's default page size (the ledger keeps it).
PAGE = 4096


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger(tmp_path / "ledger.db", POLICY).open()
    try:
        for server in SERVERS:
            await opened.map_user(server, f"{server}-uid", USER)
        yield opened
    finally:
        await opened.close()


def checkpointer(ledger: Ledger, *, pages: int = 1000, idle_s: float = 0.05) -> WalCheckpointer:
    found = ledger._file.checkpointer
    assert found is not None
    found.gather_s = 0.01
    found.pages = pages
    found.idle_s = idle_s
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


async def test_what_is_under_the_threshold_is_copied_once_writes_pause(
    ledger: Ledger, tmp_path: Path
) -> None:
    ckpt = checkpointer(ledger)
    wal = tmp_path / "ledger.db-wal"
    written = 0
    largest = 0
    for round_ in range(12):
        before = ckpt.checkpoints
        await record_played(ledger, round_)
        frames, _ = await copied_after(ckpt, before)
        written += frames
        largest = max(largest, frames)
    assert ckpt.pending() == 0
    # SQLite appends to the WAL from its start again once everything in it was copied, so
    # the file never holds much more than one transaction's pages, while a dozen of them
    # went through it.
    assert written >= 6 * largest
    assert wal.stat().st_size <= 2 * (largest + 8) * (PAGE + 24)
    assert len(await ledger.last_known_for_user("a", USER)) == 12 * PER_TX


async def test_the_wal_stays_bounded_while_writes_never_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite's own checkpoint bounds the WAL here (a checkpoint on another connection cannot
    # make SQLite write the WAL from its start while a transaction follows another): a small
    # bound, so that a few transactions cross it.
    monkeypatch.setattr(store, "WAL_AUTOCHECKPOINT_PAGES", 300)
    ledger = await Ledger(tmp_path / "ledger.db", POLICY).open()
    try:
        ckpt = checkpointer(ledger, pages=100, idle_s=3600.0)  # never idle: only thresholds
        wal = tmp_path / "ledger.db-wal"
        rounds = 40
        for round_ in range(rounds):
            await record_played(ledger, round_)
        assert ckpt.checkpoints > 0
        # 40 transactions of ~85 pages each went through it, 3,400 frames.
        assert wal.stat().st_size <= (300 + 2 * 100 + 8) * (PAGE + 24)
        assert len(await ledger.last_known_for_user("a", USER)) == rounds * PER_TX
    finally:
        await ledger.close()


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


async def test_closing_ends_the_checkpointer_even_when_the_stop_lands_as_a_wake_is_taken(
    ledger: Ledger,
) -> None:
    """A stop that comes while the thread gathers (after the write that woke it, before it
    takes the wake) must still end it: closing the ledger waited for that thread forever."""
    found = checkpointer(ledger)
    stopping = found._stopping

    class StopAsTaken(threading.Event):
        def clear(self) -> None:
            if not stopping.is_set():
                stopping.set()  # what stop() does, in its order, right before the clear
                super().set()
            super().clear()

    thread = found._thread
    assert thread is not None
    # The thread waits on the old wake until it is woken; swap in the racy one, then wake it.
    old_wake, found._wake = found._wake, StopAsTaken()
    old_wake.set()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the checkpointer's thread did not end after a stop"
