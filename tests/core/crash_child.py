"""A process that hammers a ledger until it is killed: batches of observations and pusher acks.

Run as ``python crash_child.py DB FIRST_BATCH SEED [KILL_AT]``. Each batch applies random observations
framed by two marker items (``m<k>-first`` and ``m<k>-last``, favourited on server a) in ONE
transaction, then prints ``committed <k>``; between batches it plays a pusher for a random peer
(compare, write, ack; sometimes fail or park) and prints ``acked`` after each. The parent kills it with SIGKILL at a random
moment, or, with ``KILL_AT``, the child SIGKILLs itself from inside SQLite (a progress handler)
after that many handler calls, which lands in the middle of statements and commits. Then the
parent checks the ledger: every reported batch is there with its outbox rows, and the batch
in flight at the kill is there entirely or not at all.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys

from jfsync.model import DEFAULT_USER_DATA, PlayState, UserData
from jfsync.sync.ledger import Ledger, Observation, Source
from jfsync.sync.merge import MergePolicy
from jfsync.timing import SystemClock

SERVERS = ("a", "b", "c")
USER = "alice"
ITEMS = [f"{i:032x}" for i in range(200)]
#: SQLite virtual-machine steps between two progress-handler calls.
STEPS_PER_CALL = 50
SOURCES: list[Source] = ["event", "event", "scan"]


def random_state(rng: random.Random) -> UserData:
    """A random user-data state from a small space, so repeats and reverts happen."""
    played = rng.random() < 0.5
    return UserData(
        favorite=rng.random() < 0.5,
        rating=rng.choice([None, 2.0, 8.0]),
        play_state=PlayState(
            played=played,
            play_count=rng.randint(0, 2),
            last_played_s=rng.choice([None, 1_700_000_000, 1_700_000_100]),
            position_ticks=rng.choice([0, 50_000_000]),
        ),
    )


async def push_some(ledger: Ledger, rng: random.Random, clock: SystemClock) -> None:
    """Play a pusher for one random peer: compare before write, write, then ack."""
    peer = rng.choice(SERVERS)
    for row in await ledger.due_rows(peer, rng.randint(1, 20), clock.wall_ms()):
        current = await ledger.last_known(peer, row.user, row.item) or DEFAULT_USER_DATA
        fresh = await ledger.observe_before_write(row, current, clock.wall_ms())
        if fresh is None:
            continue
        roll = rng.random()
        if roll < 0.8:
            await ledger.row_written(fresh, fresh.intended(current), clock.wall_ms())
        elif roll < 0.9:
            await ledger.row_failed(fresh, "connection refused", clock.wall_ms() + 1)
        else:
            await ledger.row_dead(fresh, "HTTP 404")
        print("acked", flush=True)


async def main(path: str, first_batch: int, seed: int, kill_at: int | None) -> None:
    """Apply batches forever (until killed)."""
    rng = random.Random(seed)
    clock = SystemClock()
    async with Ledger(path, MergePolicy(servers=SERVERS)) as ledger:
        if kill_at is not None:
            calls = 0

            def progress() -> int:
                nonlocal calls
                calls += 1
                if calls >= kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return 0

            db = ledger._db  # the harness reaches in: nothing public should offer this
            assert db is not None
            await db.set_progress_handler(progress, STEPS_PER_CALL)
        for server in SERVERS:
            await ledger.map_user(server, f"{server}-uid", USER)
        batch = first_batch
        while True:
            observations = [
                Observation("a", USER, f"m{batch}-first", UserData(favorite=True), clock.wall_ms())
            ]
            for _ in range(rng.randint(1, 60)):
                observations.append(
                    Observation(
                        rng.choice(SERVERS),
                        USER,
                        rng.choice(ITEMS),
                        random_state(rng),
                        clock.wall_ms(),
                        rng.choice(SOURCES),
                    )
                )
            observations.append(
                Observation("a", USER, f"m{batch}-last", UserData(favorite=True), clock.wall_ms())
            )
            await ledger.apply_observations(observations)
            print(f"committed {batch}", flush=True)
            await push_some(ledger, rng, clock)
            if rng.random() < 0.3:
                await ledger.retry_dead(rng.choice(SERVERS))
            batch += 1


if __name__ == "__main__":
    kill = int(sys.argv[4]) if len(sys.argv) > 4 else None
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), kill))
