"""The pusher compares its next batch, and records its last one, while it writes the current one.

During a long backlog (a bulk action of thousands of items) the next batch is read AND compared
ahead, and the writes of a batch are recorded while the next batch is being written. What was
compared ahead is only a head start: a change of one of its items that comes before its turn,
made on another server (the service wakes the pusher then) or on the peer itself (its event
passes the pusher's ``settled`` before it is applied, as the intake does), is written as the
ledger has it then, and never the older value first. Driven with a real ledger and pusher
against an emulator over loopback; the client is the real one, holding the first write of the
second batch until the third one has been compared ahead and the test has made its change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.jellyfin.api import JellyfinClient
from jfsync.model import UserData
from jfsync.service import wake_peers
from jfsync.sync.delivery import Pusher
from jfsync.sync.ledger import Ledger, Observation, OutboxRow
from jfsync.sync.merge import MergePolicy
from jfsync.timing import ManualClock
from tests.replication.harness import API_KEY, USER, USER_KEY, new_emulator, untouched_on_a_and_b
from tests.support.delivery import SetOnWrite
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

#: Rows per batch, and batches in the backlog.
BATCH = 2
ITEMS = 3 * BATCH


class HeldClient(JellyfinClient):
    """The real client; its write number :attr:`hold_at` (1-based) waits for :attr:`release`."""

    def __init__(self, *args: Any, hold_at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold_at = hold_at
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self._writes = 0

    async def write_user_data(self, *args: Any, **kwargs: Any) -> None:
        self._writes += 1
        if self._writes == self.hold_at:
            self.holding.set()
            await self.release.wait()
        await super().write_user_data(*args, **kwargs)


class CountingLedger(Ledger):
    """The real ledger; tells how many batches were compared (``observe_before_writes``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compared: list[list[str]] = []
        self.compare_done = asyncio.Event()

    async def observe_before_writes(
        self, reads: Sequence[tuple[OutboxRow, UserData]], *args: Any, **kwargs: Any
    ) -> list[OutboxRow | None]:
        fresh = await super().observe_before_writes(reads, *args, **kwargs)
        self.compared.append([row.item for row, _ in reads])
        self.compare_done.set()
        return fresh


@asynccontextmanager
async def backlog_for_b(
    tmp_path: Path,
) -> AsyncIterator[tuple[Emulator, CountingLedger, HeldClient, Pusher, ManualClock, list[str]]]:
    """Emulator ``b``; a ledger where a's user rated :data:`ITEMS` items 7 (neither server had
    data before), so b is owed three batches; b's pusher (batches of :data:`BATCH`, one lane),
    not started, whose first write of the second batch is held. Yields the items in due
    order."""
    clock = ManualClock()
    async with new_emulator("b") as b, aiohttp.ClientSession() as session:
        ledger = await CountingLedger(
            tmp_path / "ledger.db", MergePolicy(servers=("a", "b"))
        ).open()
        client = HeldClient(
            "b", b.url, API_KEY, session=session, device_id="test-ahead", hold_at=BATCH + 1
        )
        recorded = asyncio.Event()
        pusher = Pusher(
            "b",
            ledger,
            client,
            clock,
            batch_size=BATCH,
            concurrency=1,
            watcher=SetOnWrite(recorded),
        )
        try:
            items = await untouched_on_a_and_b(ledger, clock, b, ITEMS)
            clock.jump_wall(1_000)
            await ledger.apply_observations(
                [
                    Observation("a", USER_KEY, item, UserData(rating=7.0), clock.wall_ms(), "event")
                    for item in items
                ]
            )
            due = [row.item for row in await ledger.due_rows("b", ITEMS, clock.wall_ms())]
            yield b, ledger, client, pusher, clock, due
        finally:
            await pusher.stop(5)
            await ledger.close()


async def compared_while_writing(
    ledger: CountingLedger, client: HeldClient, batch: list[str]
) -> None:
    """Wait until the held write is under way and ``batch`` was compared (here: the second
    batch is being written and the third one was compared ahead)."""
    async with asyncio.timeout(10):
        await client.holding.wait()
        while sorted(batch) not in [sorted(c) for c in ledger.compared]:
            ledger.compare_done.clear()
            await ledger.compare_done.wait()


async def rate_9_on_a_during_the_compare_ahead(
    b: Emulator,
    ledger: CountingLedger,
    client: HeldClient,
    pusher: Pusher,
    clock: ManualClock,
    due: list[str],
    changed: str,
) -> None:
    """Start b's pusher; while b gets the second pair (the third compared ahead), a's user
    rates ``changed`` 9; wait until b shows 9 for it and 7 for every other item."""
    pusher.start()
    await compared_while_writing(ledger, client, due[2 * BATCH :])
    clock.jump_wall(1_000)
    applied = await ledger.apply_observation(
        "a", USER_KEY, changed, UserData(rating=9.0), clock.wall_ms()
    )
    assert applied.queued.get("b")
    wake_peers([applied], {"b": pusher}, live=True)  # what the service does after an apply
    client.release.set()
    uid = b.user_id(USER)

    def every_server_shows_it() -> bool:
        return b.user_data(uid, changed).rating == 9.0 and all(
            b.user_data(uid, item).rating == 7.0 for item in due if item != changed
        )

    await wait_until(every_server_shows_it, 10)


async def test_a_change_on_a_after_the_compare_ahead_is_written_once_as_it_stands(
    tmp_path: Path,
) -> None:
    """a's user rated six items 7; while b gets the second pair, a's user rates an item of the
    third pair 9. b shows 9 for it, and was never sent the 7 of it."""
    async with backlog_for_b(tmp_path) as (b, ledger, client, pusher, clock, due):
        third = due[2 * BATCH :]
        changed = third[0]
        await rate_9_on_a_during_the_compare_ahead(b, ledger, client, pusher, clock, due, changed)
        await wait_until(lambda: pusher.stats.writes_done == ITEMS, 10)
        sent = [w.body for w in b.writes if w.item_id == changed]
        assert sent == [{"Rating": 9.0}], sent
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_a_change_on_b_after_the_compare_ahead_is_never_written_over(
    tmp_path: Path,
) -> None:
    """a's user rated six items 7; while b gets the second pair, b's user rates an item of the
    third pair 9 on b. b keeps its 9 (never sent the 7), and a is owed the 9."""
    async with backlog_for_b(tmp_path) as (b, ledger, client, pusher, clock, due):
        uid = b.user_id(USER)
        third = due[2 * BATCH :]
        changed = third[0]
        pusher.start()
        await compared_while_writing(ledger, client, third)
        clock.jump_wall(1_000)
        b.save_user_data(uid, changed, rating=9.0)
        # The intake waits for b's writes of the event's items before applying it.
        await pusher.settled([(USER_KEY, changed)])
        await ledger.apply_observation(
            "b", USER_KEY, changed, UserData(rating=9.0), clock.wall_ms()
        )
        client.release.set()

        def every_server_shows_it() -> bool:
            return all(b.user_data(uid, item).rating == 7.0 for item in due if item != changed)

        await wait_until(every_server_shows_it, 10)
        await wait_until(lambda: pusher.stats.writes_done == ITEMS - 1, 10)
        assert b.user_data(uid, changed).rating == 9.0
        # The user's save was made on b itself: b received no write of that item over HTTP.
        assert [w.body for w in b.writes if w.item_id == changed] == []
        canonical = await ledger.canonical(USER_KEY, changed)
        assert canonical is not None
        assert canonical.data.rating == 9.0
        [to_a] = await ledger.due_rows("a", 10, clock.wall_ms())
        assert (to_a.item, to_a.desired.rating) == (changed, 9.0)
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_a_change_on_a_that_leaves_b_owed_nothing_is_never_written_over(
    tmp_path: Path,
) -> None:
    """a's user rated six items 7; while b gets the second pair, a's user clears the rating of
    an item of the third pair (b never had one). b shows no rating for it, and was never sent
    the 7 of it: the row b was owed is gone, and the batch compared ahead must see that."""
    async with backlog_for_b(tmp_path) as (b, ledger, client, pusher, clock, due):
        third = due[2 * BATCH :]
        changed = third[0]
        pusher.start()
        await compared_while_writing(ledger, client, third)
        clock.jump_wall(1_000)
        applied = await ledger.apply_observation(
            "a", USER_KEY, changed, UserData(), clock.wall_ms()
        )
        assert applied.queued == {"b": frozenset()}, "b's row is emptied, not replaced"
        wake_peers([applied], {"b": pusher}, live=True)  # what the service does after an apply
        client.release.set()

        uid = b.user_id(USER)

        def every_server_shows_it() -> bool:
            return all(b.user_data(uid, item).rating == 7.0 for item in due if item != changed)

        await wait_until(every_server_shows_it, 10)

        # Quiet: nothing owed to b any more and every write of the backlog answered.
        async def quiet() -> bool:
            return not pusher.in_flight and not await ledger.due_rows("b", 10, clock.wall_ms())

        await wait_until(quiet, 10)
        assert b.user_data(uid, changed).rating is None
        assert [w.body for w in b.writes if w.item_id == changed] == []


async def test_a_change_of_an_item_outside_the_batch_compared_ahead_is_written_too(
    tmp_path: Path,
) -> None:
    """a's user rated six items 7; while b gets the second pair, a's user rates an item of the
    first pair (written already) 9. b shows 9 for it and 7 for the rest; the third pair,
    compared ahead, is written without being compared again (none of its rows changed)."""
    async with backlog_for_b(tmp_path) as (b, ledger, client, pusher, clock, due):
        third = due[2 * BATCH :]
        changed = due[0]
        await rate_9_on_a_during_the_compare_ahead(b, ledger, client, pusher, clock, due, changed)
        await wait_until(lambda: pusher.stats.writes_done == ITEMS + 1, 10)
        assert [w.body for w in b.writes if w.item_id == changed] == [
            {"Rating": 7.0},
            {"Rating": 9.0},
        ]
        assert [sorted(c) for c in ledger.compared].count(sorted(third)) == 1, ledger.compared
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []
