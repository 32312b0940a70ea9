"""A short batch written while rows are being queued reads the next batch ahead.

A bulk action is applied in slices, the pushers woken after each: the first round takes the
first slice alone, fewer rows than a batch. Rows queued while that round reads and compares
make its writes read and compare the next batch ahead, as in a long backlog, instead of after
them with nothing in flight. The read ahead is a head start only: what the user changes on
the peer before its turn still wins. Driven with a real ledger and pusher against an emulator
over loopback; after a first item delivered, the client is the real one, holding the next
compare read until the test has queued more rows, and the next write until the batch after it
has been compared.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.model import UserData
from jfsync.sync.delivery import Pusher
from jfsync.sync.ledger import Observation
from jfsync.sync.merge import MergePolicy
from jfsync.timing import ManualClock
from tests.replication.harness import API_KEY, USER, USER_KEY, new_emulator, untouched_on_a_and_b
from tests.replication.test_compare_ahead import CountingLedger, HeldClient, compared_while_writing
from tests.support.delivery import SetOnWrite
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


class ReadHeldClient(HeldClient):
    """:class:`HeldClient` (its second write waits for ``release``) whose second compare read
    also waits, for :attr:`read_release`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, hold_at=2, **kwargs)
        self.reading = asyncio.Event()
        self.read_release = asyncio.Event()
        self._reads = 0

    async def user_data_of(self, *args: Any, **kwargs: Any) -> dict[str, UserData]:
        self._reads += 1
        if self._reads == 2:
            self.reading.set()
            await self.read_release.wait()
        return await super().user_data_of(*args, **kwargs)


@asynccontextmanager
async def one_row_for_b(
    tmp_path: Path,
) -> AsyncIterator[tuple[Emulator, CountingLedger, ReadHeldClient, Pusher, ManualClock, list[str]]]:
    """Emulator ``b``; a ledger where neither server had data of four items; b's pusher
    (batches of 2, one lane) started, which has written a's rating 7 of the first item (its
    first round after start is over). Then a's user rates the second item 7. Yields the last
    three items."""
    clock = ManualClock()
    async with new_emulator("b") as b, aiohttp.ClientSession() as session:
        ledger = await CountingLedger(
            tmp_path / "ledger.db", MergePolicy(servers=("a", "b"))
        ).open()
        client = ReadHeldClient("b", b.url, API_KEY, session=session, device_id="test-short")
        pusher = Pusher(
            "b",
            ledger,
            client,
            clock,
            batch_size=2,
            concurrency=1,
            watcher=SetOnWrite(asyncio.Event()),
        )
        try:
            items = await untouched_on_a_and_b(ledger, clock, b, 4)
            clock.jump_wall(1_000)
            await rate_on_a(ledger, clock, items[:1], 7.0)
            pusher.start()
            await wait_until(lambda: pusher.stats.writes_done == 1, 10)
            await rate_on_a(ledger, clock, items[1:2], 7.0)
            pusher.wake(live=True)  # what the service does after every apply that owes b
            yield b, ledger, client, pusher, clock, items[1:]
        finally:
            await pusher.stop(5)
            await ledger.close()


async def rate_on_a(
    ledger: CountingLedger, clock: ManualClock, items: list[str], rating: float
) -> None:
    """a's user rated ``items`` ``rating`` (the event applied, as the intake does)."""
    await ledger.apply_observations(
        [
            Observation("a", USER_KEY, item, UserData(rating=rating), clock.wall_ms(), "event")
            for item in items
        ]
    )


async def test_rows_queued_during_a_short_round_are_compared_while_it_writes(
    tmp_path: Path,
) -> None:
    """a's user rated one item 7, then two more while jfsync read b's state of the first. b
    gets all three 7s; the two were read and compared while the first was being written."""
    async with one_row_for_b(tmp_path) as (b, ledger, client, pusher, clock, items):
        await asyncio.wait_for(client.reading.wait(), 10)
        await rate_on_a(ledger, clock, items[1:], 7.0)
        pusher.wake(live=True)  # what the service does after every apply that owes b a write
        client.read_release.set()
        await compared_while_writing(ledger, client, items[1:])
        client.release.set()

        uid = b.user_id(USER)
        await wait_until(lambda: all(b.user_data(uid, i).rating == 7.0 for i in items), 10)
        await wait_until(lambda: pusher.stats.writes_done == 4, 10)
        assert [w.item_id for w in b.writes][1:] == items
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_a_change_on_b_after_that_compare_ahead_is_never_written_over(
    tmp_path: Path,
) -> None:
    """a's user rated one item 7, then two more while jfsync read b's state of the first;
    while b gets the first, b's user rates the third 9 on b. b keeps its 9 (never sent the
    7), and shows 7 for the other two."""
    async with one_row_for_b(tmp_path) as (b, ledger, client, pusher, clock, items):
        uid = b.user_id(USER)
        changed = items[2]
        await asyncio.wait_for(client.reading.wait(), 10)
        await rate_on_a(ledger, clock, items[1:], 7.0)
        pusher.wake(live=True)
        client.read_release.set()
        await compared_while_writing(ledger, client, items[1:])
        clock.jump_wall(1_000)
        b.save_user_data(uid, changed, rating=9.0)
        # The intake waits for b's writes of the event's items before applying it.
        await pusher.settled([(USER_KEY, changed)])
        await ledger.apply_observation(
            "b", USER_KEY, changed, UserData(rating=9.0), clock.wall_ms()
        )
        client.release.set()

        await wait_until(lambda: all(b.user_data(uid, i).rating == 7.0 for i in items[:2]), 10)
        await wait_until(lambda: pusher.stats.writes_done == 3, 10)
        assert b.user_data(uid, changed).rating == 9.0
        # The user's save was made on b itself: b received no write of that item over HTTP.
        assert [w.body for w in b.writes if w.item_id == changed] == []
