"""The ledger file: created for its owner only, checked read-only, a warning when others can read.

The ledger holds every user's Jellyfin token. A new one (and its WAL and shared-memory files)
is created 0600; an existing one other users can read gets a warning at start; the check used
by ``check --offline`` and ``run`` reads a ledger, even one a running jfsync holds, without
changing a byte or leaving a file behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from jfsync import cli
from jfsync.sync.ledger import Ledger
from jfsync.sync.ledger.file import check_ledger_file
from jfsync.sync.ledger.schema import LATEST_VERSION
from jfsync.sync.merge import MergePolicy
from tests.hostile.catalogue import API_A, API_B, TOKEN
from tests.support.config import write_config

pytestmark = pytest.mark.timeout(30)

POLICY = MergePolicy(servers=("home", "cabin"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def listing(root: Path) -> list[Path]:
    return list(root.iterdir())


def contents(root: Path) -> dict[str, bytes]:
    """Every file in ``root`` by name, with its bytes."""
    return {p.name: p.read_bytes() for p in root.iterdir()}


async def test_a_new_ledger_and_its_wal_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual default: files readable by everyone
    try:
        path = tmp_path / "jfsync.db"
        async with Ledger(path, POLICY) as ledger:
            await ledger.save_token("home", "u1", TOKEN)
            files = {p.name: mode(p) for p in listing(tmp_path)}
    finally:
        os.umask(old)
    assert files["jfsync.db"] == 0o600
    assert files["jfsync.db-wal"] == 0o600
    assert files["jfsync.db-shm"] == 0o600


async def test_an_existing_ledger_keeps_the_mode_its_owner_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "jfsync.db"
    async with Ledger(path, POLICY):
        pass
    os.chmod(path, 0o640)  # e.g. a backup group may read it
    async with Ledger(path, POLICY):
        pass
    assert mode(path) == 0o640


async def test_check_reads_a_sound_ledger_without_changing_anything(tmp_path: Path) -> None:
    path = tmp_path / "jfsync.db"
    async with Ledger(path, POLICY) as ledger:
        await ledger.save_token("home", "u1", TOKEN)
    before = contents(tmp_path)
    report = check_ledger_file(path)
    assert report.ok, report.problems
    assert report.schema_version == LATEST_VERSION
    assert report.warnings == []
    assert contents(tmp_path) == before


async def test_check_reads_the_ledger_of_a_running_jfsync(tmp_path: Path) -> None:
    path = tmp_path / "jfsync.db"
    async with Ledger(path, POLICY) as ledger:
        await ledger.save_token("home", "u1", TOKEN)
        assert (tmp_path / "jfsync.db-wal").exists()
        report = check_ledger_file(path)
    assert report.ok, report.problems
    assert report.schema_version == LATEST_VERSION


async def test_a_ledger_others_can_read_is_reported_at_check_and_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "j.db"
    async with Ledger(path, POLICY) as ledger:
        await ledger.save_token("home", "u1", TOKEN)
    os.chmod(path, 0o644)
    report = check_ledger_file(path)
    assert report.ok
    [warning] = report.warnings
    assert str(path) in warning
    assert "chmod 600" in warning
    config = write_config(
        tmp_path / "jfsync.yaml",
        {"home": "http://127.0.0.1:1", "cabin": "http://127.0.0.1:2"},
        api_key={"home": API_A, "cabin": API_B},
        ledger=path,
    )
    assert cli.main(["check", "--offline", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "warning: ledger:" in err
    assert "can be read by other users (mode 0644)" in err
    assert TOKEN not in err
