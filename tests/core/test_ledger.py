"""The ledger end to end on a real SQLite file: schema, clock, registers, echoes, outbox, tokens."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiosqlite
import pytest

from jfsync.model import DEFAULT_USER_DATA, PlayState, Register, UserData
from jfsync.sync.ledger import (
    ItemMapping,
    Ledger,
    LedgerError,
    LedgerInUseError,
    Observation,
    OutboxRow,
    Outcome,
)
from jfsync.sync.ledger import outbox as outbox_module
from jfsync.sync.ledger.schema import LATEST_VERSION, SchemaVersionError, migrate, prepare
from jfsync.sync.merge import MergePolicy

pytestmark = pytest.mark.timeout(30)

FAV = Register.FAVORITE
RAT = Register.RATING
PS = Register.PLAY_STATE
SERVERS = ("a", "b", "c")
POLICY = MergePolicy(servers=SERVERS)
USER = "alice"
ITEM = "9f86d081884c7d659a2feaa0c55ad015"
T0 = 1_750_000_000_000


async def _open(path: Path, policy: MergePolicy = POLICY) -> Ledger:
    ledger = await Ledger(path, policy).open()
    for server in policy.servers:
        await ledger.map_user(server, f"{server}-uid", USER, name="Alice")
    return ledger


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await _open(tmp_path / "ledger.db")
    try:
        yield opened
        assert await opened.check_invariants() == []
    finally:
        await opened.close()


async def seen_everywhere(ledger: Ledger, state: UserData, wall_ms: int, item: str = ITEM) -> None:
    """Every server shows ``state`` once (first contact), so all have history."""
    for offset, server in enumerate(SERVERS):
        await ledger.apply_observation(server, USER, item, state, wall_ms + offset, source="scan")


async def deliver(ledger: Ledger, peer: str, current: UserData, wall_ms: int) -> UserData | None:
    """Act as a pusher for one row: compare, 'write', record; return what the peer now holds."""
    rows = await ledger.due_rows(peer, 10, wall_ms)
    if not rows:
        return None
    assert len(rows) == 1
    row = await ledger.observe_before_write(rows[0], current, wall_ms)
    if row is None:
        return current
    written = row.intended(current)
    assert await ledger.row_written(row, written, wall_ms)
    return written


# ---------------------------------------------------------------------- schema


async def test_migrations_from_empty_then_idempotent_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with Ledger(path, POLICY) as ledger:
        await ledger.map_user("a", "a-uid", USER)
        await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {
        "meta",
        "servers",
        "users",
        "items",
        "server_users",
        "server_items",
        "canonical",
        "last_known",
        "pending_echo",
        "outbox",
        "tokens",
    } <= tables
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await prepare(db)
        assert await migrate(db) == []  # nothing left to apply
        rows = await db.execute_fetchall("PRAGMA foreign_keys")
        assert next(iter(rows))[0] == 1
    async with Ledger(path, POLICY) as reopened:
        canonical = await reopened.canonical(USER, ITEM)
        assert canonical is not None
        assert canonical.data == UserData(favorite=True)
        assert await reopened.outbox_depth("b") == 0  # b has no mapped user in this test


async def test_a_ledger_from_a_newer_jfsync_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with Ledger(path, POLICY):
        pass
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    with pytest.raises(SchemaVersionError, match="newer jfsync"):
        await Ledger(path, POLICY).open()


async def test_unknown_server_and_closed_ledger_are_errors(ledger: Ledger, tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="unknown server 'zz'"):
        await ledger.apply_observation("zz", USER, ITEM, DEFAULT_USER_DATA, T0)
    closed = Ledger(tmp_path / "other.db", POLICY)
    with pytest.raises(LedgerError, match="not open"):
        await closed.outbox_depth("a")


# ---------------------------------------------------------------------- hybrid clock


async def test_hybrid_clock_never_goes_backwards_across_reopen_and_wall_jump(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    async with Ledger(path, POLICY) as ledger:
        first = await ledger.apply_observation("a", USER, "i1", UserData(favorite=True), T0)
        same_ms = await ledger.apply_observation("a", USER, "i2", UserData(favorite=True), T0)
        assert first.stamp is not None
        assert same_ms.stamp is not None
        assert first.stamp.ms == T0
        assert same_ms.stamp.ms == T0 + 1
    async with Ledger(path, POLICY) as ledger:
        assert ledger.clock_ms == T0 + 1
        # The wall clock jumped back an hour while jfsync was down.
        later = await ledger.apply_observation(
            "a", USER, "i3", UserData(favorite=True), T0 - 3_600_000
        )
        assert later.stamp is not None
        assert later.stamp.ms == T0 + 2
        # ... and forward again: the wall clock is used once it is ahead.
        ahead = await ledger.apply_observation(
            "a", USER, "i4", UserData(favorite=True), T0 + 50_000
        )
        assert ahead.stamp is not None
        assert ahead.stamp.ms == T0 + 50_000
    async with Ledger(path, POLICY) as ledger:
        assert ledger.clock_ms == T0 + 50_000
        assert await ledger.check_invariants() == []


async def test_a_change_stamped_later_wins_after_a_wall_clock_jump(ledger: Ledger) -> None:
    """A user edit after a backwards clock jump still beats the edit before it."""
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(rating=3.0), T0 + 1_000)
    await ledger.apply_observation("b", USER, ITEM, UserData(rating=9.0), T0 - 60_000)
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data.rating == 9.0


# ---------------------------------------------------------------------- registers end to end

REGISTER_CASES = [
    ("favourite on", DEFAULT_USER_DATA, UserData(favorite=True), FAV),
    ("favourite off", UserData(favorite=True), DEFAULT_USER_DATA, FAV),
    ("rating set", DEFAULT_USER_DATA, UserData(rating=8.0), RAT),
    ("rating cleared", UserData(rating=8.0), DEFAULT_USER_DATA, RAT),
    (
        "played",
        DEFAULT_USER_DATA,
        UserData(play_state=PlayState(True, 1, 1_700_000_000, 0)),
        PS,
    ),
    (
        "unplayed clears the date",
        UserData(play_state=PlayState(True, 1, 1_700_000_000, 0)),
        DEFAULT_USER_DATA,
        PS,
    ),
    (
        "play count",
        UserData(play_state=PlayState(True, 1, 1_700_000_000, 0)),
        UserData(play_state=PlayState(True, 2, 1_700_000_500, 0)),
        PS,
    ),
    (
        "resume position after a playback stop",
        DEFAULT_USER_DATA,
        UserData(play_state=PlayState(False, 1, 1_700_000_000, 12_345_678)),
        PS,
    ),
]


@pytest.mark.parametrize(
    ("before", "after", "register"),
    [c[1:] for c in REGISTER_CASES],
    ids=[c[0] for c in REGISTER_CASES],
)
async def test_each_register_reaches_every_peer_and_its_echo_is_ignored(
    ledger: Ledger, before: UserData, after: UserData, register: Register
) -> None:
    await seen_everywhere(ledger, before, T0)
    assert await ledger.outbox_depth("a") == await ledger.outbox_depth("b") == 0

    applied = await ledger.apply_observation("a", USER, ITEM, after, T0 + 1_000)
    assert applied.outcome is Outcome.CHANGED
    assert applied.changed == {register}
    assert applied.queued == {"b": {register}, "c": {register}}
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == after
    assert canonical.stamped(register).origin == "a"

    for offset, peer in enumerate(("b", "c")):
        [row] = await ledger.due_rows(peer, 10, T0 + 2_000)
        assert row.registers == {register}
        assert row.desired.get(register) == after.get(register)
        assert row.remote_user_id == f"{peer}-uid"
        now = await deliver(ledger, peer, before, T0 + 2_000 + offset)
        assert now == after
        echo = await ledger.apply_observation(peer, USER, ITEM, after, T0 + 2_500 + offset)
        assert echo.outcome is Outcome.ECHO
    for server in SERVERS:
        assert await ledger.outbox_depth(server) == 0
        assert await ledger.last_known(server, USER, ITEM) == after


async def test_unchanged_registers_in_an_event_are_not_writes(ledger: Ledger) -> None:
    start = UserData(favorite=True, rating=5.0)
    await seen_everywhere(ledger, start, T0)
    again = await ledger.apply_observation("b", USER, ITEM, start, T0 + 1_000)
    assert again.outcome is Outcome.UNCHANGED
    assert again.stamp is None
    moved = await ledger.apply_observation("b", USER, ITEM, UserData(favorite=True), T0 + 2_000)
    assert moved.changed == {RAT}
    assert {r.peer: r.registers for r in await _all_rows(ledger)} == {"a": {RAT}, "c": {RAT}}


async def test_edits_of_different_registers_on_two_servers_both_survive(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 1_000)
    await ledger.apply_observation("b", USER, ITEM, UserData(rating=4.0), T0 + 1_001)
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == UserData(favorite=True, rating=4.0)
    rows = {r.peer: r.registers for r in await _all_rows(ledger)}
    assert rows == {"a": {RAT}, "b": {FAV}, "c": {FAV, RAT}}


async def test_concurrent_edits_of_one_register_converge_to_the_later_stamp(
    ledger: Ledger,
) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(rating=2.0), T0 + 1_000)
    await ledger.apply_observation("b", USER, ITEM, UserData(rating=7.0), T0 + 1_000)
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data.rating == 7.0  # observed later (hybrid clock), whatever the ms
    rows = {r.peer: r for r in await _all_rows(ledger)}
    assert set(rows) == {"a", "c"}
    assert rows["a"].desired.rating == rows["c"].desired.rating == 7.0


async def test_several_observations_of_one_key_in_one_batch_apply_in_order(
    ledger: Ledger,
) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    results = await ledger.apply_observations(
        [
            Observation("a", USER, ITEM, UserData(favorite=True), T0 + 1),
            Observation("a", USER, ITEM, UserData(favorite=True, rating=3.0), T0 + 2),
            Observation("a", USER, ITEM, UserData(favorite=True, rating=3.0), T0 + 3),
        ]
    )
    assert [r.outcome for r in results] == [Outcome.CHANGED, Outcome.CHANGED, Outcome.UNCHANGED]
    assert [r.changed for r in results] == [{FAV}, {RAT}, set()]
    [row] = await ledger.due_rows("b", 10, T0 + 10)
    assert row.registers == {FAV, RAT}
    assert row.desired == UserData(favorite=True, rating=3.0)


# ---------------------------------------------------------------------- echo rule in the ledger


async def _write(ledger: Ledger, peer: str, current: UserData, wall_ms: int) -> UserData:
    [row] = await ledger.due_rows(peer, 10, wall_ms)
    written = row.intended(current)
    await ledger.row_written(row, written, wall_ms)
    return written


async def test_debounced_echo_of_two_writes_is_one_echo(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    w1 = await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=6.0), T0 + 200)
    w2 = await _write(ledger, "b", w1, T0 + 210)
    assert len(await ledger.pending_echoes("b", USER, ITEM)) == 2
    echo = await ledger.apply_observation("b", USER, ITEM, w2, T0 + 700)
    assert echo.outcome is Outcome.ECHO
    assert await ledger.pending_echoes("b", USER, ITEM) == ()
    assert await ledger.outbox_depth("a") == 0


async def test_an_echo_of_an_older_write_is_settled_by_a_read(ledger: Ledger) -> None:
    """An event equal to an older write (a stale echo, or the user setting it back) changes
    nothing by itself; the read that follows says which it was."""
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    w1 = await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=False), T0 + 200)
    w2 = await _write(ledger, "b", w1, T0 + 210)
    stale = await ledger.apply_observation("b", USER, ITEM, w1, T0 + 610)
    assert stale.outcome is Outcome.AMBIGUOUS
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == w2  # nothing was reverted on a guess
    assert await ledger.outbox_depth("a") == 0
    # c was never written: the favourite came and went before its turn, so nothing is owed.
    assert await ledger.outbox_depth("c") == 0
    # b holds the newer write: the event was a stale echo.
    read = await ledger.apply_observation("b", USER, ITEM, w2, T0 + 620, source="read")
    assert read.outcome is Outcome.UNCHANGED
    fresh = await ledger.apply_observation("b", USER, ITEM, w2, T0 + 710)
    assert fresh.outcome is Outcome.ECHO


async def test_a_user_setting_an_older_write_back_wins_after_the_read(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    w1 = await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=False), T0 + 200)
    await _write(ledger, "b", w1, T0 + 210)
    # The user favourites it again on b, inside the debounce of the second write.
    event = await ledger.apply_observation("b", USER, ITEM, w1, T0 + 610)
    assert event.outcome is Outcome.AMBIGUOUS
    read = await ledger.apply_observation("b", USER, ITEM, w1, T0 + 620, source="read")
    assert read.outcome is Outcome.CHANGED
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == w1 == UserData(favorite=True)
    assert {r.peer for r in await _all_rows(ledger)} == {"a", "c"}
    # The older write's entry is moot now: setting it again later is the user's, not an echo.
    assert [p.state for p in await ledger.pending_echoes("b", USER, ITEM)] == [w1]


async def test_echo_that_carries_a_user_change_finds_that_change(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    written = await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    # The user rated the item on b while the write was debouncing: one flush carries both.
    mixed = UserData(favorite=True, rating=9.0)
    applied = await ledger.apply_observation("b", USER, ITEM, mixed, T0 + 610)
    assert written == UserData(favorite=True)
    assert applied.outcome is Outcome.CHANGED
    assert applied.changed == {RAT}
    assert applied.queued == {"a": {RAT}, "c": {FAV, RAT}}


async def test_a_read_equal_to_a_pending_write_does_not_consume_it(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    w1 = await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    scanned = await ledger.apply_observation("b", USER, ITEM, w1, T0 + 120, source="scan")
    assert scanned.outcome is Outcome.UNCHANGED
    assert len(await ledger.pending_echoes("b", USER, ITEM)) == 1
    event = await ledger.apply_observation("b", USER, ITEM, w1, T0 + 610)
    assert event.outcome is Outcome.ECHO


async def test_an_event_flushed_before_our_write_does_not_undo_it(ledger: Ledger) -> None:
    """b flushed its state (a no-op save) just before our write; the event lands after the ack."""
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    written = await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    late = await ledger.apply_observation("b", USER, ITEM, DEFAULT_USER_DATA, T0 + 120)
    assert late.outcome is Outcome.AMBIGUOUS
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == written == UserData(favorite=True)
    assert await ledger.outbox_depth("a") == 0
    # The read shows b holds the write: nothing changes, and its echo is still recognised.
    read = await ledger.apply_observation("b", USER, ITEM, written, T0 + 125, source="read")
    assert read.outcome is Outcome.UNCHANGED
    echo = await ledger.apply_observation("b", USER, ITEM, written, T0 + 620)
    assert echo.outcome is Outcome.ECHO


async def test_the_user_taking_our_write_back_in_the_debounce_wins(ledger: Ledger) -> None:
    """Issue 11, case 1 at the ledger: the one debounced event equals what the write replaced."""
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    event = await ledger.apply_observation("b", USER, ITEM, DEFAULT_USER_DATA, T0 + 700)
    assert event.outcome is Outcome.AMBIGUOUS
    read = await ledger.apply_observation(
        "b", USER, ITEM, DEFAULT_USER_DATA, T0 + 705, source="read"
    )
    assert read.outcome is Outcome.CHANGED
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == DEFAULT_USER_DATA
    [row] = await ledger.due_rows("a", 10, T0 + 710)
    assert row.desired.favorite is False


async def test_scan_pages_are_stale_only_if_requested_before_a_write(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    asked = ledger.ticket()  # the page is requested, then the write is acked
    await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    old_page = await ledger.apply_observation(
        "b", USER, ITEM, DEFAULT_USER_DATA, T0 + 105, source="scan", read_seq=asked
    )
    assert old_page.outcome is Outcome.OUTDATED
    # A page requested after the write shows what b holds now: the user undid it.
    new_page = await ledger.apply_observation(
        "b", USER, ITEM, DEFAULT_USER_DATA, T0 + 200, source="scan"
    )
    assert new_page.outcome is Outcome.CHANGED
    assert new_page.changed == {FAV}


async def test_forget_echoes_on_reconnect(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    assert await ledger.forget_echoes("b", USER) == 1
    assert await ledger.pending_echoes("b", USER, ITEM) == ()
    # The socket died before the echo; after reconnect the user really turns it off again.
    undo = await ledger.apply_observation("b", USER, ITEM, DEFAULT_USER_DATA, T0 + 5_000)
    assert undo.outcome is Outcome.CHANGED


# ---------------------------------------------------------------------- outbox


async def _all_rows(ledger: Ledger) -> list[OutboxRow]:
    rows: list[OutboxRow] = []
    for server in SERVERS:
        rows.extend(await ledger.due_rows(server, 100_000, 2**62))
        rows.extend(await ledger.dead_rows(server))
    return rows


async def test_a_down_peer_holds_one_row_per_item_however_many_changes(ledger: Ledger) -> None:
    items = [f"{i:032x}" for i in range(500)]
    await ledger.apply_observations(
        [
            Observation(s, USER, item, DEFAULT_USER_DATA, T0, "scan")
            for s in SERVERS
            for item in items
        ]
    )
    observations = []
    for n in range(5_000):
        item = items[n % 500]
        state = UserData(
            favorite=n % 2 == 0,
            rating=float(n % 10),
            play_state=PlayState(n % 3 == 0, n // 500, T0 // 1000 + n, 0),
        )
        observations.append(Observation("a", USER, item, state, T0 + 1_000 + n))
    for start in range(0, len(observations), 1_000):
        await ledger.apply_observations(observations[start : start + 1_000])
    assert await ledger.outbox_depth("c") == 500
    assert await ledger.outbox_depth("b") == 500
    rows = await ledger.due_rows("c", 1_000, 2**62)
    assert len({r.item for r in rows}) == 500
    last = {o.item: o.state for o in observations}
    for row in rows:
        for register in row.registers:
            assert row.desired.get(register) == last[row.item].get(register)
    age = await ledger.oldest_age("c", T0 + 61_000)
    assert age == pytest.approx(60.0, abs=1.0)


async def test_row_written_keeps_a_row_replaced_mid_flight(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [in_flight] = await ledger.due_rows("b", 10, T0 + 110)
    # While the pusher writes the favourite, the user rates the item on a.
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=5.0), T0 + 120)
    done = await ledger.row_written(in_flight, in_flight.intended(DEFAULT_USER_DATA), T0 + 130)
    assert not done
    [newer] = await ledger.due_rows("b", 10, T0 + 140)
    assert newer.version > in_flight.version
    # The favourite already arrived; only the rating is still owed.
    assert newer.registers == {RAT}
    assert newer.desired.rating == 5.0
    assert await ledger.row_written(newer, newer.intended(UserData(favorite=True)), T0 + 150)
    assert await ledger.outbox_depth("b") == 0


async def test_dead_rows_are_visible_and_revived(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [row] = await ledger.due_rows("b", 10, T0 + 110)
    assert await ledger.row_dead(row, "POST /UserItems/{itemId}/UserData -> HTTP 404")
    assert await ledger.outbox_depth("b") == 0
    assert await ledger.due_rows("b", 10, T0 + 120) == []
    [dead] = await ledger.dead_rows("b")
    assert dead.dead
    assert dead.last_error == "POST /UserItems/{itemId}/UserData -> HTTP 404"
    assert dead.registers == {FAV}
    assert not await ledger.row_dead(row, "again")  # already parked: version unchanged, but dead
    assert await ledger.retry_dead("b") == 1
    [live] = await ledger.due_rows("b", 10, T0 + 130)
    assert live.attempts == 0
    assert await ledger.dead_rows("b") == []
    # Parked again, then a newer change for the same key revives it with the new value.
    assert await ledger.row_dead(live, "HTTP 400")
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=1.0), T0 + 200)
    [revived] = await ledger.due_rows("b", 10, T0 + 210)
    assert revived.registers == {FAV, RAT}
    assert revived.last_error is None


async def test_row_dead_refuses_a_row_replaced_mid_flight(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [old] = await ledger.due_rows("b", 10, T0 + 110)
    await ledger.apply_observation("a", USER, ITEM, UserData(rating=2.0), T0 + 120)
    assert not await ledger.row_dead(old, "HTTP 404")
    assert await ledger.outbox_depth("b") == 1


async def test_failed_rows_wait_until_their_retry_time(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [row] = await ledger.due_rows("b", 10, T0 + 110)
    await ledger.row_failed(row, "connection refused", T0 + 30_000)
    assert await ledger.due_rows("b", 10, T0 + 29_999) == []
    [again] = await ledger.due_rows("b", 10, T0 + 30_000)
    assert again.attempts == 1
    assert again.last_error == "connection refused"
    assert await ledger.outbox_depth("b") == 1
    assert await ledger.reset_backoff("b") == 1
    assert len(await ledger.due_rows("b", 10, T0 + 111)) == 1


@pytest.mark.parametrize("chunk", [500, 1], ids=["skipped-by-sqlite", "beyond-a-chunk"])
async def test_due_rows_respects_limit_and_exclusions(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(outbox_module, "CHUNK", chunk)
    items = [f"{i:032x}" for i in range(6)]
    for n, item in enumerate(items):
        await ledger.apply_observation("a", USER, item, UserData(favorite=True), T0 + n)
    first = await ledger.due_rows("b", 3, T0 + 10)
    assert [r.item for r in first] == items[:3]
    rest = await ledger.due_rows("b", 2, T0 + 10, exclude=[r.id for r in first])
    assert [r.item for r in rest] == items[3:5]


async def test_compare_before_write_merges_a_change_the_events_missed(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [row] = await ledger.due_rows("b", 10, T0 + 110)
    # b's socket was down: its user rated the item and we never heard of it.
    current = UserData(rating=3.0)
    fresh = await ledger.observe_before_write(row, current, T0 + 120)
    assert fresh is not None
    assert fresh.registers == {FAV}  # the rating is b's own, not overwritten
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == UserData(favorite=True, rating=3.0)
    assert {r.peer: r.registers for r in await _all_rows(ledger)} == {
        "a": {RAT},
        "b": {FAV},
        "c": {FAV, RAT},
    }
    # Unchanged target: nothing is applied and the same row comes back.
    same = await ledger.observe_before_write(fresh, current, T0 + 130)
    assert same == fresh


async def test_compare_before_write_at_first_contact_can_make_the_row_unneeded(
    ledger: Ledger,
) -> None:
    """b was never seen; it already holds the favourite a asks for."""
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0)
    [row] = await ledger.due_rows("b", 10, T0 + 10)
    assert await ledger.observe_before_write(row, UserData(favorite=True), T0 + 20) is None
    assert await ledger.outbox_depth("b") == 0
    assert await ledger.last_known("b", USER, ITEM) == UserData(favorite=True)


async def test_seed_policy_makes_the_seed_win_at_first_contact(tmp_path: Path) -> None:
    policy = MergePolicy(servers=SERVERS, initial_merge="seed", seed_server="b")
    ledger = await _open(tmp_path / "seed.db", policy)
    try:
        await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=2.0), T0)
        [row] = await ledger.due_rows("b", 10, T0 + 10)
        # The seed holds nothing for this item: that is the truth.
        assert await ledger.observe_before_write(row, DEFAULT_USER_DATA, T0 + 20) is None
        canonical = await ledger.canonical(USER, ITEM)
        assert canonical is not None
        assert canonical.data == DEFAULT_USER_DATA
        [back] = await ledger.due_rows("a", 10, T0 + 30)
        assert back.registers == {FAV, RAT}
        # c meets the item after the seed: c's own values lose.
        late = await ledger.apply_observation("c", USER, ITEM, UserData(rating=7.0), T0 + 40)
        assert late.queued == {"c": {RAT}}
        assert await ledger.check_invariants() == []
    finally:
        await ledger.close()


async def test_backfill_queues_what_a_new_server_has_never_seen(tmp_path: Path) -> None:
    async with Ledger(tmp_path / "l.db", POLICY) as ledger:
        await ledger.map_user("a", "a-uid", USER)
        await ledger.map_user("b", "b-uid", USER)
        await ledger.apply_observation("a", USER, "i1", UserData(favorite=True), T0)
        await ledger.apply_observation("a", USER, "i2", DEFAULT_USER_DATA, T0 + 1)
        await ledger.apply_observation("c", USER, "i3", UserData(rating=2.0), T0 + 2)
        # The user now exists on c too: c is owed what it has never seen and is not default.
        await ledger.map_user("c", "c-uid", USER)
        assert await ledger.backfill("c", USER, T0 + 20) == 1
        [row] = await ledger.due_rows("c", 10, T0 + 30)
        assert (row.item, row.registers) == ("i1", frozenset({FAV}))
        assert await ledger.backfill("c", USER, T0 + 40) == 0  # nothing new the second time
        assert await ledger.check_invariants() == []


async def test_remote_ids_come_from_the_id_maps(ledger: Ledger) -> None:
    await ledger.map_items(
        "b",
        [ItemMapping("b-item-1", ITEM, "Movie", "/m/x.mkv", {"Imdb": "tt1"})],
    )
    assert await ledger.item_for("b", "b-item-1") == ITEM
    assert await ledger.item_for("b", "nope") is None
    assert await ledger.user_for("c", "c-uid") == USER
    assert await ledger.servers_with_user(USER) == list(SERVERS)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0)
    [row] = await ledger.due_rows("b", 10, T0 + 10)
    assert (row.remote_user_id, row.remote_item_id) == ("b-uid", "b-item-1")
    [row_c] = await ledger.due_rows("c", 10, T0 + 10)
    assert (row_c.remote_user_id, row_c.remote_item_id) == ("c-uid", None)


async def test_only_servers_that_have_the_user_get_rows(tmp_path: Path) -> None:
    async with Ledger(tmp_path / "l.db", POLICY) as ledger:
        await ledger.map_user("a", "a-uid", USER)
        await ledger.map_user("b", "b-uid", USER)
        applied = await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0)
        assert applied.queued == {"b": {FAV}}
        assert await ledger.outbox_depth("c") == 0


async def test_last_known_for_user_lists_every_item(ledger: Ledger) -> None:
    await ledger.apply_observation("b", USER, "i1", UserData(favorite=True), T0, source="scan")
    await ledger.apply_observation("b", USER, "i2", UserData(rating=1.0), T0, source="scan")
    assert await ledger.last_known_for_user("b", USER) == {
        "i1": UserData(favorite=True),
        "i2": UserData(rating=1.0),
    }
    assert await ledger.last_known_for_user("c", USER) == {}


# ---------------------------------------------------------------------- tokens


async def test_tokens_persist_and_never_show_in_reprs(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    secret = "d3adb33fd3adb33fd3adb33fd3adb33f"
    async with Ledger(path, POLICY) as ledger:
        assert await ledger.load_token("srv-1", "user-1") is None
        await ledger.save_token("srv-1", "user-1", secret)
        await ledger.save_token("srv-1", "user-2", "other")
        assert secret not in repr(ledger)
    async with Ledger(path, POLICY) as ledger:
        assert await ledger.load_token("srv-1", "user-1") == secret
        await ledger.forget_token("srv-1", "user-1")
        assert await ledger.load_token("srv-1", "user-1") is None
        assert await ledger.load_token("srv-1", "user-2") == "other"


# ---------------------------------------------------------------------- volume


@pytest.mark.timeout(60)
async def test_ten_thousand_observations_apply_in_one_batch(ledger: Ledger) -> None:
    observations = [
        Observation(
            "a", USER, f"{i:032x}", UserData(play_state=PlayState(True, 1, 1_000 + i, 0)), T0 + i
        )
        for i in range(10_000)
    ]
    results = await ledger.apply_observations(observations)
    assert all(r.outcome is Outcome.CHANGED for r in results)
    assert await ledger.outbox_depth("b") == 10_000
    assert await ledger.outbox_depth("c") == 10_000


async def test_a_newer_change_keeps_a_failed_row_waiting_for_its_retry(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [row] = await ledger.due_rows("b", 10, T0 + 110)
    await ledger.row_failed(row, "connection refused", T0 + 30_000)
    # b is down; the user rates the item on a meanwhile: the row owes both, still at its retry.
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=4.0), T0 + 200)
    assert await ledger.due_rows("b", 10, T0 + 29_999) == []
    [later] = await ledger.due_rows("b", 10, T0 + 30_000)
    assert later.registers == {FAV, RAT}
    assert (later.attempts, later.last_error) == (1, "connection refused")
    # b is back: everything owed goes now, and a newer change does not push it back.
    assert await ledger.reset_backoff("b") == 1
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=6.0), T0 + 300)
    [now] = await ledger.due_rows("b", 10, T0 + 310)
    assert now.desired.rating == 6.0


async def test_what_was_forgotten_of_a_server_is_a_first_contact_next(ledger: Ledger) -> None:
    await seen_everywhere(ledger, UserData(favorite=True), T0)
    assert await ledger.forget_server_history("b") == 1
    # b shows the favourite off: not the user's edit (jfsync knows nothing of b now), merged.
    seen = await ledger.apply_observation("b", USER, ITEM, DEFAULT_USER_DATA, T0 + 100)
    assert seen.first_contact
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data.favorite
    # The same after an identity change forgets what c held of the item.
    await ledger.remap_items("c", forget=[ITEM])
    assert (
        await ledger.apply_observation("c", USER, ITEM, DEFAULT_USER_DATA, T0 + 200)
    ).first_contact


async def test_forgotten_echoes_are_not_matched_by_the_next_event(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    await _write(ledger, "b", DEFAULT_USER_DATA, T0 + 110)
    assert await ledger.forget_echoes("b", USER) == 1
    # b's socket reconnected; the favourite it reports now is b's state, not an awaited echo.
    event = await ledger.apply_observation("b", USER, ITEM, UserData(favorite=True), T0 + 5_000)
    assert event.outcome is Outcome.UNCHANGED


async def test_a_retired_item_seen_again_starts_from_nothing(ledger: Ledger) -> None:
    await seen_everywhere(ledger, UserData(favorite=True), T0)
    assert await ledger.retire_items([ITEM]) == [ITEM]  # no server maps it (identical ids)
    assert await ledger.canonical(USER, ITEM) is None
    back = await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    assert back.first_contact
    assert back.outcome is Outcome.CHANGED


async def test_a_row_dropped_for_a_send_only_server_is_queued_anew_when_it_receives(
    ledger: Ledger,
) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    # The config makes b send-only: the favourite queued for it is dropped.
    await ledger.set_policy(replace(ledger.policy, send_only=frozenset({"b"})))
    assert await ledger.prune_outbox() == {"b": 1}
    assert await ledger.due_rows("b", 10, T0 + 110) == []
    # b receives again and the user rates the item on a: b is owed the rating at once...
    await ledger.set_policy(replace(ledger.policy, send_only=frozenset()))
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=4.0), T0 + 200)
    assert [r.registers for r in await ledger.due_rows("b", 10, T0 + 210)] == [{RAT}]
    # ... and the favourite it missed while it only sent, once the service asks for it.
    assert await ledger.requeue_differences("b", T0 + 300) == 1
    [row] = await ledger.due_rows("b", 10, T0 + 310)
    assert row.registers == {FAV, RAT}
    assert await deliver(ledger, "b", DEFAULT_USER_DATA, T0 + 320) == UserData(
        favorite=True, rating=4.0
    )


async def test_registers_a_person_stops_syncing_are_not_written_from_a_queued_row(
    ledger: Ledger,
) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True, rating=4.0), T0 + 100)
    [queued] = await ledger.due_rows("b", 10, T0 + 110)
    # Alice now syncs only favourites: the rating is taken out of the rows queued for her.
    await ledger.set_policy(ledger.policy.with_user_fields({USER: frozenset({FAV})}))
    assert await ledger.prune_outbox() == {}
    # The pusher holding the row from before writes only the favourite.
    row = await ledger.observe_before_write(queued, DEFAULT_USER_DATA, T0 + 200)
    assert row is not None
    assert row.registers == {FAV}
    assert await ledger.row_written(row, row.intended(DEFAULT_USER_DATA), T0 + 210)
    assert await ledger.due_rows("b", 10, T0 + 220) == []


async def test_a_write_a_library_filter_left_out_is_not_handed_to_the_pusher(
    ledger: Ledger,
) -> None:
    other = "0" * 32
    await ledger.map_items("b", [ItemMapping("b-1", ITEM), ItemMapping("b-2", other)])
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [queued] = await ledger.due_rows("b", 10, T0 + 110)
    # b's filter now leaves the item out: its index no longer maps it, the write is dropped.
    await ledger.remap_items("b", unmapped=["b-1"])
    assert await ledger.drop_unmapped_rows("b") == 1
    assert await ledger.drop_unmapped_rows("c") == 0  # c has no index: nothing to judge by
    assert await ledger.observe_before_write(queued, DEFAULT_USER_DATA, T0 + 200) is None
    assert await ledger.due_rows("b", 10, T0 + 210) == []


async def test_one_process_writes_a_ledger_file_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    first = await Ledger(path, POLICY).open()
    second = Ledger(path, POLICY)
    try:
        with pytest.raises(LedgerInUseError) as caught:
            await second.open()
        message = str(caught.value)
        assert str(path) in message
        assert f"pid {os.getpid()}" in message
        assert "--dry-run" in message
    finally:
        await first.close()
    # Released on close (and by the kernel when a process dies, however it dies).
    await second.open()
    await second.close()


# ---------------------------------------------------------------------- reads older than events
# Issue 11, case 2: a read requested before a live event but applied after it must never
# override the event (every read carries the time it was requested).


async def test_a_scan_page_older_than_an_event_does_not_revert_it(ledger: Ledger) -> None:
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    page_asked = T0 + 1_000
    page_ticket = ledger.ticket()
    # While the page is on its way, the user favourites the item on a; the event lands first.
    event = await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 1_600)
    assert event.outcome is Outcome.CHANGED
    page = await ledger.apply_observation(
        "a", USER, ITEM, DEFAULT_USER_DATA, page_asked, source="scan", read_seq=page_ticket
    )
    assert page.outcome is Outcome.OUTDATED
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data.favorite is True
    assert await ledger.last_known("a", USER, ITEM) == UserData(favorite=True)
    for peer in ("b", "c"):
        [row] = await ledger.due_rows(peer, 10, T0 + 1_700)
        assert row.desired.favorite is True
    # A page asked for after the event is applied as usual.
    later = await ledger.apply_observation(
        "a", USER, ITEM, DEFAULT_USER_DATA, T0 + 2_000, source="scan", read_seq=ledger.ticket()
    )
    assert later.outcome is Outcome.CHANGED


async def test_a_compare_read_older_than_an_event_neither_reverts_nor_overwrites(
    ledger: Ledger,
) -> None:
    """The pusher read b (ahead), then the user rated the item 8 on b: the rating is kept, the
    row carrying it to a stays, and the row to b is not written over the read."""
    await seen_everywhere(ledger, DEFAULT_USER_DATA, T0)
    await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 100)
    [row] = await ledger.due_rows("b", 10, T0 + 200)
    read_asked = T0 + 200
    read_ticket = ledger.ticket()
    rated = await ledger.apply_observation("b", USER, ITEM, UserData(rating=8.0), T0 + 900)
    assert rated.outcome is Outcome.CHANGED
    [fresh] = await ledger.observe_before_writes(
        [(row, DEFAULT_USER_DATA)], T0 + 950, read_ms=read_asked, read_seq=read_ticket
    )
    assert fresh is None  # not written on an outdated read: read again next round
    canonical = await ledger.canonical(USER, ITEM)
    assert canonical is not None
    assert canonical.data == UserData(favorite=True, rating=8.0)
    [to_a] = await ledger.due_rows("a", 10, T0 + 1_000)
    assert to_a.desired.rating == 8.0
    assert Register.RATING in to_a.registers
    # The next round reads b again and writes the favourite over the rating b now shows.
    [again] = await ledger.due_rows("b", 10, T0 + 1_000)
    [fresh] = await ledger.observe_before_writes(
        [(again, UserData(rating=8.0))], T0 + 1_010, read_ms=T0 + 1_000, read_seq=ledger.ticket()
    )
    assert fresh is not None
    assert fresh.intended(UserData(rating=8.0)) == UserData(favorite=True, rating=8.0)


async def test_more_items_than_the_kept_ids_still_reach_every_peer_right(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A library larger than the item ids the ledger keeps in memory (shrunk to 5 here): the
    # user marks 12 films played in one go, then favourites every third one by one, then
    # un-plays the first. Every film ends on every peer as the user left it.
    from jfsync.sync.ledger import maps

    monkeypatch.setattr(maps, "ITEM_ID_LIMIT", 5)
    items = [f"{n:032x}" for n in range(1, 13)]
    played = UserData(play_state=PlayState(True, 1, 1_700_000_000, 0))
    await ledger.apply_observations(
        [Observation("a", USER, item, played, T0, "event") for item in items]
    )
    for n, item in enumerate(items[::3]):
        await ledger.apply_observation("a", USER, item, replace(played, favorite=True), T0 + n + 1)
    await ledger.apply_observation("a", USER, items[0], UserData(favorite=True), T0 + 100)
    expected = {item: replace(played, favorite=n % 3 == 0) for n, item in enumerate(items)}
    expected[items[0]] = UserData(favorite=True)
    for item, state in expected.items():
        canonical = await ledger.canonical(USER, item)
        assert canonical is not None, item
        assert canonical.data == state, item
    for peer in ("b", "c"):
        rows = await ledger.due_rows(peer, 100, T0 + 1_000)
        assert {r.item: r.intended(UserData()) for r in rows} == expected
