"""Ledger throughput: observations applied per second (one batch, batches, one by one) and the
pusher's side (due rows, compare-before-write, ack) in rows per second.

Run: ``.venv/bin/python bench/bench_ledger.py [--count 10000]``. Each scenario uses a fresh
ledger file in a temporary directory with three servers that all have the user, so every
observation writes canonical, last-known and two outbox rows.

The floor of the "one batch" and "one by one" scenarios (issue 13: a single event within 5x of
raw SQLite) is measured in the same run: the rows the ledger added (every table, read back
from its file) are written again by plain ``sqlite3`` into a copy of the ledger as it was before,
with the same schema and pragmas (WAL, synchronous NORMAL), in as many transactions as the
ledger used (one, or one per observation), each ``INSERT OR REPLACE`` of that transaction's
share of every table's rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import emit

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


def snapshot(source: Path, target: Path) -> None:
    """Copy the database ``source`` (open elsewhere, WAL included) to ``target``."""
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def added_rows(before: Path, after: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Per table, the rows of ``after`` that ``before`` does not have (new or changed)."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    with (
        contextlib.closing(sqlite3.connect(before)) as old,
        contextlib.closing(sqlite3.connect(after)) as new,
    ):
        tables = [
            str(r[0])
            for r in new.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
            )
        ]
        for table in tables:
            known = set(old.execute(f'SELECT * FROM "{table}"'))
            rows = [r for r in new.execute(f'SELECT * FROM "{table}"') if r not in known]
            if rows:
                found[table] = rows
    return found


def raw_floor(base: Path, rows: dict[str, list[tuple[Any, ...]]], transactions: int) -> float:
    """Seconds for plain sqlite3 to write ``rows`` into a copy of ``base`` in ``transactions``."""
    target = base.with_name(base.stem + "-raw.db")
    shutil.copyfile(base, target)
    db = sqlite3.connect(target, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        statements = {
            table: f'INSERT OR REPLACE INTO "{table}" VALUES ({", ".join("?" * len(r[0]))})'
            for table, r in rows.items()
        }
        started = time.perf_counter()
        for n in range(transactions):
            db.execute("BEGIN IMMEDIATE")
            for table, table_rows in rows.items():
                share = len(table_rows)
                chunk = table_rows[n * share // transactions : (n + 1) * share // transactions]
                if chunk:
                    db.executemany(statements[table], chunk)
            db.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        db.close()


async def run(count: int, batch: int) -> None:
    """Time each scenario (and the raw SQLite floor of two) and print observations per second."""
    work = observations(count)
    figures: dict[str, Any] = {"count": count}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for label, size in (
            ("one batch", count),
            (f"batches of {batch}", batch),
            ("one by one", 1),
        ):
            name = label.replace(" ", "-")
            ledger = await fresh_ledger(directory, name)
            base = directory / f"{name}-base.db"
            snapshot(directory / f"{name}.db", base)
            try:
                started = time.perf_counter()
                for start in range(0, count, size):
                    await ledger.apply_observations(work[start : start + size])
                elapsed = time.perf_counter() - started
                depth = await ledger.outbox_depth("b")
            finally:
                await ledger.close()
            line = (
                f"{label:>18}: {count} observations in {elapsed:6.2f} s = "
                f"{count / elapsed:8.0f} obs/s (outbox b: {depth})"
            )
            if size in (1, count):
                transactions = count // size
                rows = added_rows(base, directory / f"{name}.db")
                raw_s = raw_floor(base, rows, transactions)
                key = "single" if size == 1 else "batch"
                figures[f"{key}_s"] = elapsed
                figures[f"{key}_raw_s"] = raw_s
                figures[f"{key}_rows"] = sum(len(r) for r in rows.values())
                line += (
                    f"; raw sqlite3, same {figures[f'{key}_rows']} rows in {transactions} "
                    f"transaction(s): {raw_s:6.2f} s, ratio {elapsed / raw_s:.1f}x"
                )
            print(line, flush=True)
        figures["drain_rows_per_s"] = await drain(directory, work, batch)
    emit("ledger", **figures)


async def drain(directory: Path, work: list[Observation], batch: int) -> float:
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
    return drained / elapsed


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(run(args.count, args.batch))


if __name__ == "__main__":
    main()
