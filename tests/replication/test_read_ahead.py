"""The pusher reads its next batch ahead while it writes the current one.

What it read ahead is only a head start: a change that comes after the next batch was read,
and before its turn, is written as the ledger has it then, once, never the older value first.
Driven with a real ledger and pusher against an emulator over loopback; the client is the real
one, holding the first write until the test has made its change.
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
from jfsync.jellyfin.api import JellyfinClient
from jfsync.model import UserData
from jfsync.sync.delivery import Pusher
from jfsync.sync.ledger import Ledger, Observation
from jfsync.sync.merge import MergePolicy
from jfsync.timing import ManualClock
from tests.replication.harness import API_KEY, USER, USER_KEY, new_emulator, untouched_on_a_and_b
from tests.support.delivery import SetOnWrite
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


class HeldClient(JellyfinClient):
    """The real client; its first write waits for :attr:`release`, and it tells when the
    second item listing (the batch read ahead) has been read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.read_ahead = asyncio.Event()
        self._listings = 0

    async def write_user_data(self, *args: Any, **kwargs: Any) -> None:
        if not self.holding.is_set():
            self.holding.set()
            await self.release.wait()
        await super().write_user_data(*args, **kwargs)

    async def user_data_of(self, *args: Any, **kwargs: Any) -> dict[str, UserData]:
        found = await super().user_data_of(*args, **kwargs)
        self._listings += 1
        if self._listings == 2:
            self.read_ahead.set()
        return found


@asynccontextmanager
async def pusher_to_b(
    tmp_path: Path,
) -> AsyncIterator[tuple[Emulator, Ledger, HeldClient, Pusher, ManualClock, asyncio.Event]]:
    """Emulator ``b``, a ledger knowing servers a and b, and b's pusher (batches of two, one
    lane) through a :class:`HeldClient`; the event is set after every recorded write."""
    clock = ManualClock()
    async with new_emulator("b") as b, aiohttp.ClientSession() as session:
        ledger = await Ledger(tmp_path / "ledger.db", MergePolicy(servers=("a", "b"))).open()
        client = HeldClient("b", b.url, API_KEY, session=session, device_id="test-read-ahead")
        recorded = asyncio.Event()
        pusher = Pusher(
            "b",
            ledger,
            client,
            clock,
            batch_size=2,
            concurrency=1,
            watcher=SetOnWrite(recorded),
        )
        try:
            yield b, ledger, client, pusher, clock, recorded
        finally:
            await pusher.stop(5)
            await ledger.close()


async def test_a_change_after_the_read_ahead_is_written_once_as_it_stands(
    tmp_path: Path,
) -> None:
    async with pusher_to_b(tmp_path) as (b, ledger, client, pusher, clock, recorded):
        await ledger.map_user("a", "a-user", USER_KEY)
        await ledger.map_user("b", b.user_id(USER), USER_KEY)
        items = [item.id for item in b.leaf_items()[:4]]
        # a's user favourites four items: four rows for b, two batches of two.
        await ledger.apply_observations(
            [
                Observation("a", USER_KEY, item, UserData(favorite=True), clock.wall_ms(), "event")
                for item in items
            ]
        )
        due = await ledger.due_rows("b", 10, clock.wall_ms())
        second_batch = [row.item for row in due[2:]]
        pusher.start()
        async with asyncio.timeout(10):
            await client.holding.wait()  # the first batch is being written...
            await client.read_ahead.wait()  # ...and the second one has been read ahead
        # Now a's user also rates an item of the second batch.
        changed = second_batch[0]
        await ledger.apply_observation(
            "a", USER_KEY, changed, UserData(favorite=True, rating=7.0), clock.wall_ms()
        )
        client.release.set()

        uid = b.user_id(USER)

        def converged() -> bool:
            return b.user_data(uid, changed) == UserData(favorite=True, rating=7.0) and all(
                b.user_data(uid, item).favorite for item in items
            )

        await wait_until(converged, 10, changed=recorded)
        writes = [w for w in b.writes if w.item_id == changed]
        assert len(writes) == 1, [w.body for w in writes]
        assert writes[0].body is not None
        assert writes[0].body.get("Rating") == 7.0
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_a_user_change_on_the_peer_after_its_read_ahead_is_kept(tmp_path: Path) -> None:
    """Issue 11, case 2 in the pusher: b was read ahead (no rating); then b's user rated the
    item 8 and the event was applied. The older read must neither revert the rating in the
    ledger (and drop the row carrying it to a) nor be written over on b."""
    async with pusher_to_b(tmp_path) as (b, ledger, client, pusher, clock, recorded):
        uid = b.user_id(USER)
        # Both servers are known to hold nothing yet, so the favourites are plain changes.
        items = await untouched_on_a_and_b(ledger, clock, b, 4)
        clock.jump_wall(1_000)
        await ledger.apply_observations(
            [
                Observation("a", USER_KEY, item, UserData(favorite=True), clock.wall_ms(), "event")
                for item in items
            ]
        )
        due = await ledger.due_rows("b", 10, clock.wall_ms())
        changed = due[2].item
        pusher.start()
        async with asyncio.timeout(10):
            await client.holding.wait()
            await client.read_ahead.wait()
        # b's user rates the item now; the event reaches jfsync before its turn comes.
        clock.jump_wall(1_000)
        b.save_user_data(uid, changed, rating=8.0)
        await ledger.apply_observation(
            "b", USER_KEY, changed, UserData(rating=8.0), clock.wall_ms()
        )
        clock.jump_wall(1_000)
        client.release.set()

        def converged() -> bool:
            return b.user_data(uid, changed) == UserData(favorite=True, rating=8.0) and all(
                b.user_data(uid, item).favorite for item in items
            )

        await wait_until(converged, 10, changed=recorded)
        canonical = await ledger.canonical(USER_KEY, changed)
        assert canonical is not None
        assert canonical.data == UserData(favorite=True, rating=8.0)
        [to_a] = await ledger.due_rows("a", 10, clock.wall_ms())
        assert (to_a.item, to_a.desired.rating) == (changed, 8.0)
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []
