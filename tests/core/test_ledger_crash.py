"""Crash safety: a process applying observations is SIGKILLed at random points, then checked."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

import pytest

from jfsync.model import Register
from jfsync.sync.ledger import Ledger
from jfsync.sync.merge import MergePolicy

CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[2]
SERVERS = ("a", "b", "c")
USER = "alice"


async def _run_and_kill(
    db: Path, first_batch: int, seed: int, kill_after: int | None, kill_at: int | None
) -> list[int]:
    """Start the child and SIGKILL it; return the batches it reported committed.

    With ``kill_after`` the parent kills it after that many progress lines (the child keeps
    working while the parent reads, so the kill lands somewhere in a batch, an ack or a
    retry); with ``kill_at`` the child kills itself from inside SQLite, mid-statement.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        str(db),
        str(first_batch),
        str(seed),
        *([str(kill_at)] if kill_at is not None else []),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    committed: list[int] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            lines = 0
            while kill_after is None or lines < kill_after:
                line = await proc.stdout.readline()
                if not line:
                    if kill_at is not None:
                        break  # it killed itself, as asked
                    assert proc.stderr is not None
                    err = await proc.stderr.read()
                    pytest.fail(f"child exited early: {err.decode(errors='replace')[-2000:]}")
                lines += 1
                if line.startswith(b"committed "):
                    committed.append(int(line.split()[1]))
    finally:
        if proc.returncode is None and kill_after is not None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return committed


async def _check(db: Path, committed: list[int], in_flight: int) -> None:
    async with Ledger(db, MergePolicy(servers=SERVERS)) as ledger:
        assert await ledger.check_invariants() == []
        for batch in committed:
            for marker in (f"m{batch}-first", f"m{batch}-last"):
                canonical = await ledger.canonical(USER, marker)
                assert canonical is not None, f"committed batch {batch} lost {marker}"
                assert canonical.data.favorite
                for peer in ("b", "c"):
                    row = await ledger.get_row(peer, USER, marker)
                    known = await ledger.last_known(peer, USER, marker)
                    owed = row is not None and Register.FAVORITE in row.registers
                    assert owed or (known is not None and known.favorite), (
                        f"{marker}: the change is neither queued for {peer} nor delivered"
                    )
        first = await ledger.canonical(USER, f"m{in_flight}-first")
        last = await ledger.canonical(USER, f"m{in_flight}-last")
        assert (first is None) == (last is None), f"batch {in_flight} was half-written"


async def _crash_loop(tmp_path: Path, iterations: int, seed: int) -> None:
    db = tmp_path / "ledger.db"
    rng = random.Random(seed)
    clock_before = 0
    for iteration in range(iterations):
        first_batch = iteration * 100_000
        if iteration % 2:
            kill_after, kill_at = None, rng.randint(1, 3_000)
        else:
            kill_after, kill_at = rng.randint(1, 60), None
        committed = await _run_and_kill(db, first_batch, rng.randrange(2**32), kill_after, kill_at)
        assert committed == list(range(first_batch, first_batch + len(committed)))
        await _check(db, committed, first_batch + len(committed))
        async with Ledger(db, MergePolicy(servers=SERVERS)) as ledger:
            assert ledger.clock_ms >= clock_before
            clock_before = ledger.clock_ms


@pytest.mark.timeout(120)
async def test_sigkill_at_random_points_loses_and_half_writes_nothing(tmp_path: Path) -> None:
    await _crash_loop(tmp_path, iterations=6, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_sigkill_soak(tmp_path: Path) -> None:
    await _crash_loop(tmp_path, iterations=60, seed=random.randrange(2**32))
