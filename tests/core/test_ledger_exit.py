"""A ledger left open by a failure must not keep the process alive at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from jfsync.sync.ledger import Ledger
    from jfsync.sync.merge import MergePolicy

    KEPT = []  # a live reference, as a traceback or a forgotten service object would hold

    async def main():
        ledger = Ledger(sys.argv[1], MergePolicy(servers=("a", "b")))
        await ledger.open()
        KEPT.append(ledger)
        await ledger.save_token("a", "u", "t")
        print("left open", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(60)
def test_process_exits_with_an_unclosed_ledger_and_keeps_what_was_committed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "left open" in result.stdout
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
            "'select count(*) from tokens').fetchone()[0])",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert check.stdout.strip() == "1"
