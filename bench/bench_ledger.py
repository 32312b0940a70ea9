"""Ledger throughput: observations applied per second (one batch, batches, one by one) and the
pusher's side (due rows, compare-before-write, ack) in rows per second.

Run: ``.venv/bin/python bench/bench_ledger.py [--count 10000]``. Each scenario uses a fresh
ledger file in a temporary directory with three servers that all have the user, so every
observation writes canonical, last-known and two outbox rows.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from jfsync.model import PlayState, UserData
from jfsync.sync.ledger import Ledger, Observation
from jfsync.sync.merge import MergePolicy

SERVERS = ("a", "b", "c")
USER = "alice"
T0 = 1_750_000_000_000


def observations(count: int) -> list[Observation]:
    """``count`` distinct items marked played on server a (a burst like a bulk 'mark played')."""
    return [
        Observation(
            "a",
            USER,
            f"{i:032x}",
            UserData(play_state=PlayState(True, 1, 1_750_000_000 + i, 0)),
            T0 + i,
        )
        for i in range(count)
    ]


async def fresh_ledger(directory: Path, name: str) -> Ledger:
    """Open a new ledger where every server has the user."""
    ledger = await Ledger(directory / f"{name}.db", MergePolicy(servers=SERVERS)).open()
    for server in SERVERS:
        await ledger.map_user(server, f"{server}-uid", USER)
    return ledger


async def run(count: int, batch: int) -> None:
    """Time each scenario and print observations per second."""
    work = observations(count)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for label, size in (
            ("one batch", count),
            (f"batches of {batch}", batch),
            ("one by one", 1),
        ):
            ledger = await fresh_ledger(directory, label.replace(" ", "-"))
            try:
                started = time.perf_counter()
                for start in range(0, count, size):
                    await ledger.apply_observations(work[start : start + size])
                elapsed = time.perf_counter() - started
                depth = await ledger.outbox_depth("b")
            finally:
                await ledger.close()
            print(
                f"{label:>18}: {count} observations in {elapsed:6.2f} s = "
                f"{count / elapsed:8.0f} obs/s (outbox b: {depth})"
            )
        await drain(directory, work, batch)


async def drain(directory: Path, work: list[Observation], batch: int) -> None:
    """Time a pusher's ledger side: due rows, compare-before-write, ack, ``batch`` at a time."""
    ledger = await fresh_ledger(directory, "drain")
    try:
        await ledger.apply_observations(work)
        before = UserData()
        started = time.perf_counter()
        drained = 0
        while rows := await ledger.due_rows("b", batch, T0 + 10**9):
            fresh = await ledger.observe_before_writes([(r, before) for r in rows], T0 + 10**9)
            acks = [(r, r.intended(before)) for r in fresh if r is not None]
            done = await ledger.rows_written(acks, T0 + 10**9)
            drained += sum(done)
        elapsed = time.perf_counter() - started
    finally:
        await ledger.close()
    print(
        f"{'pusher drain':>18}: {drained} rows compared and acked in {elapsed:6.2f} s = "
        f"{drained / elapsed:8.0f} rows/s"
    )


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(run(args.count, args.batch))


if __name__ == "__main__":
    main()
