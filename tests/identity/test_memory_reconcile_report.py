"""The reconcile's report keeps every write on disk, not in memory, and still tells all of it.

A first reconcile of a large library makes hundreds of thousands of writes; the report appends
each to a temporary file as it is made (``WriteLog``) and reads them back when asked. Here the
log's memory buffer is two writes, so nearly every write goes through the file: the report must
still list exactly the writes each server received, print the same counts and samples (a short
sample from memory, a longer one from the file), read the same twice, and leave no file behind
once it is dropped.
"""

from __future__ import annotations

import gc
import io
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jfsync.model import PlayState, Register, UserData
from jfsync.ops.reconcilecmd import PlannedWrite, WriteLog, print_outcome, run_reconcile
from tests.identity.conftest import MakeStack, emulator

pytestmark = pytest.mark.timeout(60)

PLAYED = datetime(2024, 1, 1, 12, tzinfo=UTC)


async def test_every_write_is_reported_from_the_log_and_the_file_goes_with_it(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(WriteLog, "BUFFER", 2)
    monkeypatch.setattr(WriteLog, "FIRST", 2)  # samples past 2 a (user, server): from the file
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    stack = await make_stack(
        [emulator("a", root="/mnt/a", leaves=40), emulator("b", root="/srv/b", leaves=40)],
        start=False,
    )
    pairs = stack.pairs("a", "b")[:30]
    # alice played 30 items on a, and marked 5 of those favourite on b.
    for x, _ in pairs:
        stack.change("a", x.id, played=True, play_count=1, last_played=PLAYED)
    for _, y in pairs[:5]:
        stack.change("b", y.id, is_favorite=True)
    for emu in stack.emus.values():
        await emu.flush_now()
        emu.writes.clear()

    outcome = await run_reconcile(stack.config, dry_run=False)
    assert outcome.ok, (outcome.problems, outcome.failures)

    assert len(outcome.writes) == 35
    assert outcome.counts() == {("name:alice", "b"): 30, ("name:alice", "a"): 5}
    for name, emu in stack.emus.items():
        received = sorted(w.item_id for w in emu.writes if w.status < 300)
        reported = sorted(w.remote_item_id for w in outcome.writes if w.server == name)
        assert reported == received
    played = PlayState(True, 1, int(PLAYED.timestamp()), 0)
    on_b = {w.remote_item_id: w for w in outcome.writes if w.server == "b"}
    for x, y in pairs:
        write = on_b[y.id]
        assert write.after.play_state == played
        assert write.label.startswith(f"{x.name} ")  # the item's name, not its id
    assert list(outcome.writes) == list(outcome.writes)  # read again, the same

    out = io.StringIO()
    print_outcome(outcome, out, sample=3)
    text = out.getvalue()
    assert "user alice:\n  a: 5 items changed\n" in text
    assert "  b: 30 items changed\n" in text
    assert text.count("unplayed -> played (1 play, last 2024-01-01 12:00)") == 3
    assert "    ... and 27 more\n" in text
    assert "    ... and 2 more\n" in text
    assert "total: 35 writes made" in text
    # A shorter sample (from memory) shows the same first writes.
    one = io.StringIO()
    print_outcome(outcome, one, sample=1)
    first_lines = [line for line in one.getvalue().splitlines() if " -> " in line]
    assert len(first_lines) == 2
    assert all(line in text.splitlines() for line in first_lines)
    assert "    ... and 29 more\n" in one.getvalue()

    # Nothing is left to do; the log files go once their reports do.
    after = await run_reconcile(stack.config, dry_run=True)
    assert after.writes == []
    assert after.ok
    assert list(spool.iterdir())
    del outcome, after, on_b, write
    gc.collect()
    assert list(spool.iterdir()) == []


def planned(n: int) -> PlannedWrite:
    return PlannedWrite(
        "b",
        "name:alice",
        f"item{n}",
        f"remote{n}",
        f"Film {n} (2001) [Movie]",
        UserData(),
        UserData(favorite=n % 2 == 0, rating=float(n % 10) or None, play_state=PlayState(True, n)),
        frozenset({Register.FAVORITE, Register.PLAY_STATE}),
    )


def test_a_log_that_cannot_write_its_file_keeps_every_write_in_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(WriteLog, "BUFFER", 3)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    log = WriteLog()
    writes = [planned(n) for n in range(10)]
    for write in writes[:6]:
        log.append(write)  # two slices of three written to the file
    real_open = open

    def full_disk(path: str, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", full_disk)
    for write in writes[6:]:
        log.append(write)
    monkeypatch.undo()
    assert "cannot use a temporary file" in caplog.text
    assert list(log) == writes
    assert len(log) == 10
    assert log.counts() == {("name:alice", "b"): 10}
    del log
    gc.collect()
    assert list(tmp_path.iterdir()) == []
