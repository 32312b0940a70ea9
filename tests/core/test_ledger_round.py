"""A pusher round's compare and acks on the ledger, where usual and unusual rows share one call.

Most rows of a round are the usual case (the peer shows what the ledger last knew of it; the
row acked is still the one written), and the ledger decides those without its general apply;
the others (the user changed something on the peer, a row replaced while it was written, a
change that moved the canonical value back) must come out as they do alone. Each test runs
one round of several items through one ``observe_before_writes`` and one ``rows_written``
call, and checks every item as a user would: what each server is owed, what jfsync takes the
peer to hold, and that the echo of each write is recognised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jfsync.model import DEFAULT_USER_DATA, PlayState, UserData
from jfsync.sync.ledger import Ledger, Observation, OutboxRow, Outcome
from jfsync.sync.merge import MergePolicy

pytestmark = pytest.mark.timeout(30)

SERVERS = ("a", "b")
USER = "alice"
ITEMS = [f"{n:032x}" for n in range(1, 7)]
T0 = 1_750_000_000_000
PLAYED = UserData(play_state=PlayState(True, 1, 1_750_000_000, 0))


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger(tmp_path / "ledger.db", MergePolicy(servers=SERVERS)).open()
    try:
        for server in SERVERS:
            await opened.map_user(server, f"{server}-uid", USER)
        # Both servers showed every item untouched; then the user marked them played on a.
        for item in ITEMS:
            for offset, server in enumerate(SERVERS):
                await opened.apply_observation(
                    server, USER, item, DEFAULT_USER_DATA, T0 + offset, source="scan"
                )
        await opened.apply_observations(
            [_event(item, PLAYED, T0 + 100) for item in ITEMS]  # one bulk message
        )
        yield opened
        assert await opened.check_invariants() == []
    finally:
        await opened.close()


def _event(item: str, state: UserData, wall_ms: int) -> Observation:
    return Observation("a", USER, item, state, wall_ms, "event")


def _intents(row: OutboxRow, current: UserData) -> list[UserData]:
    return [row.intended(current)]


async def _due(ledger: Ledger, now_ms: int) -> dict[str, OutboxRow]:
    return {row.item: row for row in await ledger.due_rows("b", 100, now_ms)}


async def test_a_round_with_a_user_change_on_the_peer_keeps_it_and_writes_the_rest(
    ledger: Ledger,
) -> None:
    due = await _due(ledger, T0 + 200)
    assert set(due) == set(ITEMS)
    # Meanwhile the user favourited the third item on b (not seen by the event path yet).
    changed = ITEMS[2]
    reads = [
        (due[item], UserData(favorite=True) if item == changed else DEFAULT_USER_DATA)
        for item in ITEMS
    ]
    ticket = ledger.ticket()
    fresh = await ledger.observe_before_writes(
        reads, T0 + 210, intents=_intents, read_ms=T0 + 205, read_seq=ticket
    )
    # Every item is still owed to b: played (the favourite on b is kept, not written over).
    assert all(row is not None for row in fresh)
    by_item = {row.item: row for row in fresh if row is not None}
    assert by_item[changed].registers == {"play_state"}
    assert by_item[changed].intended(UserData(favorite=True)) == UserData(
        True, None, PLAYED.play_state
    )
    for item in ITEMS:
        if item != changed:
            assert by_item[item] is due[item]  # nothing changed: the pusher's own row
    # The favourite the user set on b is now owed to a.
    [to_a] = await ledger.due_rows("a", 100, T0 + 220)
    assert (to_a.item, to_a.desired.favorite) == (changed, True)

    # The writes land; each ack records what b now holds.
    acks = [
        (row, row.intended(current)) for row, (_, current) in zip(fresh, reads, strict=True) if row
    ]
    assert await ledger.rows_written(acks, T0 + 230) == [True] * len(ITEMS)
    assert await ledger.due_rows("b", 100, T0 + 240) == []
    for row, written in acks:
        assert await ledger.last_known("b", USER, row.item) == written
        # b pushes each write back: recognised as jfsync's own, nothing changes.
        applied = await ledger.apply_observation("b", USER, row.item, written, T0 + 700)
        assert applied.outcome is Outcome.ECHO


async def test_a_round_whose_rows_were_replaced_mid_flight_keeps_what_is_still_owed(
    ledger: Ledger,
) -> None:
    due = await _due(ledger, T0 + 200)
    reads = [(due[item], DEFAULT_USER_DATA) for item in ITEMS]
    fresh = await ledger.observe_before_writes(
        reads, T0 + 210, intents=_intents, read_ms=T0 + 205, read_seq=ledger.ticket()
    )
    assert [row.item for row in fresh if row is not None] == [row.item for row, _ in reads]
    # While the round is written, the user rates two items on a, and takes the play of a
    # third back (its canonical value moves back to what b held before the write).
    rated, unplayed = ITEMS[1:3], ITEMS[4]
    for item in rated:
        await ledger.apply_observation(
            "a", USER, item, UserData(False, 7.0, PLAYED.play_state), T0 + 220
        )
    await ledger.apply_observation("a", USER, unplayed, DEFAULT_USER_DATA, T0 + 221)
    acks = [(row, row.intended(DEFAULT_USER_DATA)) for row in fresh if row is not None]
    done = await ledger.rows_written(acks, T0 + 230)
    assert done == [row.item not in (*rated, unplayed) for row, _ in acks]
    left = await _due(ledger, T0 + 240)
    assert set(left) == {*rated, unplayed}
    for item in rated:  # the play arrived; only the rating is still owed
        assert left[item].desired.rating == 7.0
        assert left[item].registers == {"rating"}
    # The write just made b played again: b is owed the un-play now.
    assert left[unplayed].desired == DEFAULT_USER_DATA
    for item in ITEMS:
        assert await ledger.last_known("b", USER, item) == PLAYED
