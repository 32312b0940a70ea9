"""Pusher drain: how fast one peer's outbox of 10,000 rows is written, and at what CPU cost.

The ledger and one :class:`jfsync.sync.delivery.Pusher` run in this process (as in ``jfsync run``);
the peer is an emulator in a subprocess of its own (``python -m jfsync.emulator``), so the
server's work is not counted here. Each repetition applies ``--rows`` changes from server
``a`` in one transaction (a bulk "mark played"), then times the drain into the emulator
until every write is recorded. Printed per repetition: the apply (wall and event-loop CPU)
and the drain (wall, event-loop CPU per row, the other threads' CPU: SQLite's worker and the WAL
checkpointer, from the start of the apply), then SQLite's worker thread alone: its CPU in the
apply and in the drain.

For comparison, ``--bare`` also times the same number of writes (same route and body) sent by
a bare aiohttp loop at the pusher's concurrency to the same emulator, for another user (so
they do not change what the pusher finds there): HTTP work only, no ledger. This is the bench for
A/B comparisons of the delivery path (compare the medians of runs made together: this
machine's speed drifts by 20-30% over minutes).

Run from the repository root::

    .venv/bin/python bench/bench_pusher.py                 # --rows 10000 --repeat 3
    .venv/bin/python bench/bench_pusher.py --bare
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_replication import API_KEY, floor_run, free_port  # noqa: E402
from results import emit  # noqa: E402

from jfsync.jellyfin.api import JellyfinClient  # noqa: E402
from jfsync.jellyfin.wire import update_body  # noqa: E402
from jfsync.model import PlayState, UserData  # noqa: E402
from jfsync.ops.runcmd import tune_garbage_collector  # noqa: E402
from jfsync.sync.delivery import Delivered, DeliveryWatcher, Pusher  # noqa: E402
from jfsync.sync.ledger import Ledger, Observation  # noqa: E402
from jfsync.sync.merge import MergePolicy  # noqa: E402
from jfsync.timing import SystemClock  # noqa: E402

USER = "alice"
OTHER_USER = "bob"


def thread_cpu(ledger: Ledger) -> Callable[[], float]:
    """A reader of the CPU seconds used so far by ``ledger``'s SQLite worker thread (where every
    transaction runs; the WAL checkpointer and the event loop are other threads)."""
    worker = ledger._db._thread if ledger._db is not None else None  # (private: a bench)
    ident = getattr(worker, "ident", None)
    if ident is None:
        return lambda: 0.0
    clock = time.pthread_getcpuclockid(ident)
    return lambda: time.clock_gettime(clock)


def played(rep: int) -> UserData:
    """The state written in repetition ``rep`` (a new date and count each time)."""
    return UserData(play_state=PlayState(True, rep + 1, 1_700_000_000 + rep * 86_400, 0))


async def wait_up(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until the emulator answers."""
    async with asyncio.timeout(30):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/System/Info/Public") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)  # another process starting: nothing here to wait on


async def run(rows: int, repeat: int, with_bare: bool) -> None:
    """Start the emulator, drain ``repeat`` times, print the figures."""
    port = free_port()
    emulator = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped in finally
        [
            sys.executable,
            "-m",
            "jfsync.emulator",
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--library-size",
            str(rows + 10),
            "--debounce",
            "0",
            "--seed",
            "3",
        ],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    drains: list[float] = []
    bares: list[float] = []
    applies: list[float] = []
    cpu_rows: list[float] = []
    sqlite_drain: list[float] = []
    bare_cpu_rows: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with aiohttp.ClientSession() as session:
                await wait_up(session, url)
                client = JellyfinClient(
                    "b", url, API_KEY, session=session, device_id="bench-pusher"
                )
                users = {u.name: u.id for u in await client.users()}
                uid = users[USER]
                items = [
                    item.id
                    async for item in client.iter_items(
                        uid, include_types=("Movie", "Episode"), fields=()
                    )
                ][:rows]
                ledger = Ledger(Path(tmp) / "ledger.db", MergePolicy(servers=("a", "b")))
                await ledger.open()
                await ledger.map_user("a", "ab" * 16, USER)
                await ledger.map_user("b", uid, USER)
                clock = SystemClock()
                written = [0]
                target = [0]
                done = asyncio.Event()

                class Counted(DeliveryWatcher):
                    def written(self, peer: str, writes: Sequence[Delivered]) -> None:
                        written[0] += len(writes)
                        if written[0] >= target[0]:
                            done.set()

                pusher = Pusher("b", ledger, client, clock, watcher=Counted())
                pusher.start()
                tune_garbage_collector()  # as jfsync run does
                sqlite_cpu = thread_cpu(ledger)
                try:
                    for rep in range(repeat):
                        state = played(rep)
                        batch = [
                            Observation("a", USER, item, state, clock.wall_ms(), "event")
                            for item in items
                        ]
                        target[0] += len(items)
                        done.clear()
                        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
                        s0 = sqlite_cpu()
                        await ledger.apply_observations(batch)
                        t1, c1, s1 = time.perf_counter(), time.thread_time(), sqlite_cpu()
                        pusher.wake()
                        await asyncio.wait_for(done.wait(), 300)
                        t2, c2, p2 = time.perf_counter(), time.thread_time(), time.process_time()
                        s2 = sqlite_cpu()
                        sqlite_drain.append(s2 - s1)
                        drains.append(t2 - t1)
                        applies.append(t1 - t0)
                        cpu_rows.append(1e6 * (c2 - c1) / rows)
                        line = (
                            f"[{rep + 1}] apply {t1 - t0:.2f} s (loop CPU {c1 - c0:.2f} s); "
                            f"drain {t2 - t1:.2f} s, loop CPU {1e6 * (c2 - c1) / rows:.0f} us/row, "
                            f"other threads {(p2 - p0) - (c2 - c0):.2f} s "
                            f"(SQLite's thread: apply {s1 - s0:.2f} s, drain {s2 - s1:.2f} s)"
                        )
                        if with_bare:
                            body = update_body(played(rep), frozenset({"play_state"}))
                            bodies = dict.fromkeys(items, body)
                            c3 = time.thread_time()
                            bares.append(await floor_run(url, users[OTHER_USER], bodies))
                            c4 = time.thread_time()
                            bare_cpu_rows.append(1e6 * (c4 - c3) / len(bodies))
                            line += (
                                f"; bare aiohttp {bares[-1]:.2f} s, "
                                f"loop CPU {1e6 * (c4 - c3) / len(bodies):.0f} us/row"
                            )
                        print(line, flush=True)
                finally:
                    await pusher.stop(5)
                    await ledger.close()
    finally:
        emulator.terminate()
        emulator.wait()
    summary = f"{rows} rows: drain median {statistics.median(drains):.2f} s"
    if bares:
        summary += f", bare aiohttp median {statistics.median(bares):.2f} s"
    print(summary)
    emit(
        "pusher",
        rows=rows,
        repeat=repeat,
        apply_s=applies,
        drain_s=drains,
        bare_s=bares,
        cpu_us_per_row=cpu_rows,
        sqlite_drain_s=sqlite_drain,
        bare_cpu_us_per_row=bare_cpu_rows,
    )


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="outbox rows per repetition")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions in one process")
    parser.add_argument("--bare", action="store_true", help="also time a bare aiohttp loop")
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.repeat, args.bare))


if __name__ == "__main__":
    main()
