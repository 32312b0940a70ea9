"""The ledger file itself: a file that is not a ledger is refused, a lost file takes no writes.

SQLite takes an empty file for a new database and keeps writing into a file that was deleted
or replaced under it. Either way jfsync would go on with a ledger nobody will ever read; these
tests check that it refuses instead, with one clear line.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from jfsync.cli import main
from jfsync.sync.ledger import Ledger, LedgerFileError, LedgerFileLostError
from jfsync.sync.merge import MergePolicy
from tests.support.config import write_config

pytestmark = pytest.mark.timeout(20)

POLICY = MergePolicy(servers=("home", "cabin"))


def _config(tmp_path: Path, ledger: Path) -> Path:
    return write_config(
        tmp_path / "jfsync.yaml",
        {"home": "http://127.0.0.1:1", "cabin": "http://127.0.0.1:2"},
        api_key={"home": "k" * 32, "cabin": "c" * 32},
        ledger=ledger,
    )


def committed(
    db_file: Path, wal: Path, query: str, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    """Run ``query`` on what a process committed to ``db_file`` and its write-ahead log
    ``wal`` (a copy of both, so neither is touched)."""
    work = db_file.parent / f"copy-{db_file.name}"
    work.write_bytes(db_file.read_bytes())
    if wal.exists():
        Path(f"{work}-wal").write_bytes(wal.read_bytes())
    db = sqlite3.connect(work)
    try:
        return list(db.execute(query, params).fetchall())
    finally:
        db.close()
        for leftover in (work, Path(f"{work}-wal"), Path(f"{work}-shm")):
            leftover.unlink(missing_ok=True)


async def test_an_empty_ledger_file_is_refused_not_taken_for_a_new_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"")

    with pytest.raises(LedgerFileError, match="is an empty \\(0-byte\\) file, not a ledger"):
        await Ledger(path, POLICY).open()

    assert path.read_bytes() == b""  # not turned into a new ledger
    # The lock was given back: once the file is dealt with, the ledger opens.
    path.unlink()
    async with Ledger(path, POLICY) as ledger:
        await ledger.save_token("s", "u", "t")
    assert path.read_bytes().startswith(b"SQLite format 3\x00")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"servers:\n  - name: home\n" * 10, "is not an SQLite database"),
        (b"SQLite format 3\x00" + b"\x00\x03" + b"\x00" * 82, "damaged SQLite header"),
    ],
)
async def test_a_file_that_is_not_a_ledger_is_refused(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(content)
    with pytest.raises(LedgerFileError, match=says):
        await Ledger(path, POLICY).open()
    assert path.read_bytes() == content


def test_jfsync_run_refuses_an_empty_ledger_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "ledger.db"
    ledger.write_bytes(b"")
    config = _config(tmp_path, ledger)

    for command in ("run", "reconcile"):
        code = main([command, "--config", str(config)])
        captured = capsys.readouterr()
        assert code == 2
        assert captured.err.splitlines() == [
            f"jfsync {command}: the ledger {ledger} is an empty (0-byte) file, not a ledger; "
            "restore it from a backup, or move it away to start a new ledger"
        ]
    code = main(["retry-dead", "--config", str(config)])
    assert code == 2
    assert "is an empty (0-byte) file" in capsys.readouterr().err
    assert ledger.read_bytes() == b""


async def test_a_missing_ledger_file_is_still_created(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ledger.db"
    path.parent.mkdir()
    async with Ledger(path, POLICY) as ledger:
        await ledger.save_token("s", "u", "t")
        assert ledger.file_problem() is None
    async with Ledger(path, POLICY) as ledger:
        assert await ledger.load_token("s", "u") == "t"


async def test_a_deleted_ledger_takes_no_more_writes_and_says_why_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    told: list[str] = []
    async with Ledger(path, POLICY) as ledger:
        ledger.file_lost_observers.append(told.append)
        await ledger.save_token("s", "u", "before")
        os.link(path, tmp_path / "orphan.db")  # keeps the inode readable after the delete
        path.unlink()

        for _ in range(2):
            with pytest.raises(LedgerFileLostError, match="was deleted while jfsync had it open"):
                await ledger.save_token("s", "u", "after")
        assert len(told) == 1
        assert "was deleted" in told[0]
        assert ledger.file_problem() == told[0]
    assert not path.exists()
    # The write after the delete went nowhere: the orphaned file (with the write-ahead log
    # SQLite left at the path) holds the state before.
    assert committed(tmp_path / "orphan.db", Path(f"{path}-wal"), "SELECT token FROM tokens") == [
        ("before",)
    ]


async def test_a_replaced_ledger_takes_no_more_writes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    content = other.read_bytes()
    async with Ledger(path, POLICY) as ledger:
        await ledger.save_token("s", "u", "before")
        os.replace(other, path)
        with pytest.raises(LedgerFileLostError, match="was replaced by another file"):
            await ledger.save_token("s", "u", "after")
        # Reads still answer (a status page can say what happened), from the file opened.
        assert await ledger.load_token("s", "u") == "before"
    await asyncio.sleep(0)
    assert path.read_bytes() == content  # the file now at the path was not written
