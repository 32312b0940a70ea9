"""A live change goes from its apply straight to the peer, and the user's last action still wins.

The apply of a few changes reads, in its own transaction, the rows now due for each peer it
queued something for, and the pusher it wakes starts its round from them instead of asking
the ledger again. A round's writes are recorded in the background, so the next change is
read and written while that transaction runs. Driven end to end (emulators, jfsync between
them, the real ledger and pusher) at the worst moments: the user changes the item on the
peer while the round is about to compare it, changes it again while its write is in flight,
and jfsync stops while a write is being recorded.
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
from jfsync.sync.delivery import Pusher
from jfsync.sync.ledger import Ledger, Observation, OutboxRow
from jfsync.sync.merge import MergePolicy
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import API_KEY, USER, USER_KEY, new_emulator, untouched_on_a_and_b
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


async def test_a_rating_on_b_while_the_live_round_reads_b_survives_the_favourite_from_a(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    x = cluster.free_items[0]
    client = cluster.service.links["b"].client
    real_read = client.user_data_of
    changed_on_b: list[UserData] = []

    async def read_b(user: str, items: Any) -> Any:
        wanted = list(items)
        if x in wanted and not changed_on_b:
            # alice rates x 9 on b just as jfsync reads b before writing the favourite there.
            changed_on_b.append(cluster.change(b, x, rating=9.0))
        return await real_read(user, wanted)

    monkeypatch.setattr(client, "user_data_of", read_b)
    # alice favourites x on a; then, on b, rates it 9.
    cluster.change(a, x, is_favorite=True)
    await cluster.wait(lambda: bool(changed_on_b))
    # Both of her actions show on every server: the write to b did not undo the rating.
    await cluster.wait_all_hold(x, UserData(favorite=True, rating=9.0))
    assert all("Rating" not in (w.body or {}) for w in cluster.writes(b, [x]))


async def test_a_change_made_while_the_last_one_is_written_reaches_b_at_once(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A manual clock: nothing but the changes themselves can make the pusher write again (its
    # idle poll never comes).
    cluster = await make_cluster(2, clock=ManualClock())
    a = cluster.emus[0]
    x = cluster.free_items[0]
    client = cluster.service.links["b"].client
    real_write = client.write_user_data
    holding = asyncio.Event()
    release = asyncio.Event()

    async def write_b(*args: Any, **kwargs: Any) -> None:
        if not holding.is_set():
            holding.set()
            await release.wait()
        await real_write(*args, **kwargs)

    monkeypatch.setattr(client, "write_user_data", write_b)
    # alice favourites x on a; while that write to b is under way she rates x 8 on a.
    cluster.change(a, x, is_favorite=True)
    await asyncio.wait_for(holding.wait(), 20)
    cluster.change(a, x, rating=8.0)
    await cluster.wait(lambda: cluster.svc().counters.changes_applied >= 2)
    release.set()
    # b gets the favourite, then the rating, with no timer involved; every server shows both.
    await cluster.wait_all_hold(x, UserData(favorite=True, rating=8.0))


async def test_jfsync_stopped_while_a_write_is_recorded_loses_nothing_and_writes_nothing_twice(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    x, y = cluster.free_items[:2]
    ledger = cluster.service.ledger
    real_rows_written = ledger.rows_written
    recording = asyncio.Event()
    go_on = asyncio.Event()

    async def rows_written(acks: Any, *args: Any, **kwargs: Any) -> Any:
        if any(row.peer == "b" and row.item == x for row, _ in acks) and not recording.is_set():
            recording.set()
            await go_on.wait()
        return await real_rows_written(acks, *args, **kwargs)

    monkeypatch.setattr(ledger, "rows_written", rows_written)
    # alice favourites x on a; b holds it, and jfsync stops while recording that write.
    cluster.change(a, x, is_favorite=True)
    await asyncio.wait_for(recording.wait(), 20)
    assert cluster.holds(b, x, UserData(favorite=True))
    stopping = asyncio.ensure_future(cluster.stop_service())
    await asyncio.sleep(0)  # the stop begins while the recording waits
    go_on.set()
    await stopping
    writes_to_b = len(cluster.writes(b, [x]))
    # jfsync starts again; alice favourites y on a meanwhile.
    cluster.change(a, y, is_favorite=True)
    await cluster.start_service()
    await cluster.wait_all_hold(y, UserData(favorite=True))
    await cluster.wait_quiet([x, y])
    # x stays as she left it everywhere, and was not written to b again.
    assert cluster.all_hold(x, UserData(favorite=True))
    assert len(cluster.writes(b, [x])) == writes_to_b


class CountingLedger(Ledger):
    """The real ledger; counts the due-row reads made before each compare. While
    :attr:`hold` is clear, a recording of writes waits for it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.due_reads = 0
        self.due_reads_at_compare: list[int] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()

    async def rows_written(self, *args: Any, **kwargs: Any) -> list[bool]:
        if not self.hold.is_set():
            self.holding.set()
            await self.hold.wait()
        return await super().rows_written(*args, **kwargs)

    async def due_rows(self, *args: Any, **kwargs: Any) -> list[OutboxRow]:
        self.due_reads += 1
        return await super().due_rows(*args, **kwargs)

    async def observe_before_writes(
        self, reads: Sequence[tuple[OutboxRow, UserData]], *args: Any, **kwargs: Any
    ) -> list[OutboxRow | None]:
        self.due_reads_at_compare.append(self.due_reads)
        return await super().observe_before_writes(reads, *args, **kwargs)


class HeldClient(JellyfinClient):
    """The real client; while :attr:`hold` is clear, a write waits for it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()

    async def write_user_data(self, *args: Any, **kwargs: Any) -> None:
        if not self.hold.is_set():
            self.holding.set()
            await self.hold.wait()
        await super().write_user_data(*args, **kwargs)


@asynccontextmanager
async def idle_pusher_for_b(
    tmp_path: Path,
) -> AsyncIterator[tuple[Emulator, CountingLedger, Pusher, ManualClock, str]]:
    """Emulator ``b``; a ledger where a's and b's user have never touched two items; b's
    pusher started, through its first (empty) round and idle. Yields the first item (the
    second is ``b.leaf_items()[1]``)."""
    clock = ManualClock()
    async with new_emulator("b") as b, aiohttp.ClientSession() as session:
        ledger = await CountingLedger(
            tmp_path / "ledger.db", MergePolicy(servers=("a", "b"))
        ).open()
        client = HeldClient("b", b.url, API_KEY, session=session, device_id="test-live")
        pusher = Pusher("b", ledger, client, clock)
        try:
            item, _ = await untouched_on_a_and_b(ledger, clock, b, 2)
            pusher.start()
            assert await pusher.wait_recovered(10)
            yield b, ledger, pusher, clock, item
        finally:
            await pusher.stop(5)
            await ledger.close()


async def apply_event(
    ledger: Ledger, clock: ManualClock, item: str, data: UserData
) -> dict[str, list[OutboxRow]]:
    """Apply a change of a's user as the intake does; return the rows due it read."""
    clock.jump_wall(1_000)
    due: dict[str, list[OutboxRow]] = {}
    await ledger.apply_observations(
        [Observation("a", USER_KEY, item, data, clock.wall_ms(), "event")],
        due=due,
        due_limit=Pusher.LIVE_ROWS,
    )
    return due


async def live_change(
    ledger: Ledger, pusher: Pusher, clock: ManualClock, item: str, data: UserData
) -> dict[str, list[OutboxRow]]:
    """A change of a's user as the intake and the service take it in: applied, its due rows
    offered to b's pusher, which is woken as for live work; return the rows due it read."""
    due = await apply_event(ledger, clock, item, data)
    pusher.offer(due["b"])
    pusher.wake(live=True)
    return due


async def rated_7_and_recorded_slowly(
    b: Emulator, ledger: CountingLedger, pusher: Pusher, clock: ManualClock, item: str
) -> None:
    """a's user rates ``item`` 7; b gets it, and jfsync is slow to record that write (the
    record waits until ``ledger.hold`` is set again)."""
    ledger.hold.clear()
    await live_change(ledger, pusher, clock, item, UserData(rating=7.0))
    await asyncio.wait_for(ledger.holding.wait(), 10)
    assert b.user_data(b.user_id(USER), item).rating == 7.0


async def test_a_live_change_is_compared_and_written_without_asking_for_due_rows(
    tmp_path: Path,
) -> None:
    async with idle_pusher_for_b(tmp_path) as (b, ledger, pusher, clock, item):
        # a's user rates the item 7.
        due = await apply_event(ledger, clock, item, UserData(rating=7.0))
        assert [row.item for row in due["b"]] == [item]
        reads = ledger.due_reads
        pusher.offer(due["b"])
        pusher.wake(live=True)
        uid = b.user_id(USER)
        await wait_until(lambda: b.user_data(uid, item).rating == 7.0, 10)
        # The round compared the row the apply read, with no due-row read of its own.
        assert ledger.due_reads_at_compare == [reads]
        await wait_until(lambda: pusher.stats.writes_done == 1, 10)
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_a_row_replaced_after_it_was_offered_is_written_as_it_stands(
    tmp_path: Path,
) -> None:
    async with idle_pusher_for_b(tmp_path) as (b, ledger, pusher, clock, item):
        # a's user rates the item 7, then 9, before b's pusher gets to it: the rows offered
        # are those of the 7.
        offered = await apply_event(ledger, clock, item, UserData(rating=7.0))
        pusher.offer(offered["b"])
        await apply_event(ledger, clock, item, UserData(rating=9.0))
        pusher.wake(live=True)
        uid = b.user_id(USER)
        await wait_until(lambda: b.user_data(uid, item).rating == 9.0, 10)
        await wait_until(lambda: pusher.stats.writes_done == 1, 10)
        # b was sent her last rating only, and nothing is owed any more.
        assert [w.body for w in b.writes if w.item_id == item] == [{"Rating": 9.0}]
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_a_change_made_while_the_last_write_is_recorded_reaches_b_once_it_is(
    tmp_path: Path,
) -> None:
    async with idle_pusher_for_b(tmp_path) as (b, ledger, pusher, clock, item):
        other = b.leaf_items()[1].id
        uid = b.user_id(USER)
        # a's user rates the first item 7; b gets it, and jfsync is slow to record that write.
        await rated_7_and_recorded_slowly(b, ledger, pusher, clock, item)
        # Meanwhile she rates the second item 8 and the first one 9.
        for key, rating in ((other, 8.0), (item, 9.0)):
            await live_change(ledger, pusher, clock, key, UserData(rating=rating))
        ledger.hold.set()
        # b shows her last ratings, each value was sent once, and nothing is owed any more.
        await wait_until(
            lambda: (b.user_data(uid, item).rating, b.user_data(uid, other).rating) == (9.0, 8.0),
            10,
        )
        await wait_until(lambda: pusher.stats.writes_done == 3, 10)
        sent = sorted((w.item_id, w.body["Rating"]) for w in b.writes if w.body)
        assert sent == sorted([(item, 7.0), (other, 8.0), (item, 9.0)])
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_a_change_of_another_item_does_not_wait_for_the_last_write_to_be_recorded(
    tmp_path: Path,
) -> None:
    async with idle_pusher_for_b(tmp_path) as (b, ledger, pusher, clock, item):
        other = b.leaf_items()[1].id
        uid = b.user_id(USER)
        # a's user rates the first item 7; b gets it, and jfsync is slow to record that write
        # (its pusher, with nothing else due, is between rounds).
        await rated_7_and_recorded_slowly(b, ledger, pusher, clock, item)
        # Meanwhile she rates the second item 8: b shows it while that record still waits.
        await live_change(ledger, pusher, clock, other, UserData(rating=8.0))
        await wait_until(lambda: b.user_data(uid, other).rating == 8.0, 10)
        assert pusher.stats.writes_done == 0  # nothing recorded yet
        ledger.hold.set()
        # Both writes are recorded once it goes on; each value was sent once; nothing is owed.
        await wait_until(lambda: pusher.stats.writes_done == 2, 10)
        sent = [(w.item_id, w.body) for w in b.writes]
        assert sent == [(item, {"Rating": 7.0}), (other, {"Rating": 8.0})]
        assert b.user_data(uid, item).rating == 7.0
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []


async def test_changes_made_while_a_write_is_in_flight_are_written_next_as_they_stand(
    tmp_path: Path,
) -> None:
    async with idle_pusher_for_b(tmp_path) as (b, ledger, pusher, clock, item):
        other = b.leaf_items()[1].id
        uid = b.user_id(USER)
        client = pusher._client
        assert isinstance(client, HeldClient)
        # a's user rates the first item 7; its write to b is slow to go.
        client.hold.clear()
        await live_change(ledger, pusher, clock, item, UserData(rating=7.0))
        await asyncio.wait_for(client.holding.wait(), 10)
        # Meanwhile she rates the second item 8, and the first one 9.
        for key, rating in ((other, 8.0), (item, 9.0)):
            await live_change(ledger, pusher, clock, key, UserData(rating=rating))
        reads = ledger.due_reads
        client.hold.set()
        # b shows her last ratings: the second item's from the rows offered (no due-row read
        # before its compare), then the first item's 9 once its 7 was recorded.
        await wait_until(
            lambda: (b.user_data(uid, item).rating, b.user_data(uid, other).rating) == (9.0, 8.0),
            10,
        )
        await wait_until(lambda: pusher.stats.writes_done == 3, 10)
        assert ledger.due_reads_at_compare[1] == reads
        sent = [(w.item_id, w.body) for w in b.writes]
        assert sent == [(item, {"Rating": 7.0}), (other, {"Rating": 8.0}), (item, {"Rating": 9.0})]
        assert await ledger.due_rows("b", 10, clock.wall_ms()) == []
