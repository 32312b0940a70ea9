"""Ledger races the replication runs hit: a change that arrives while a write is on its way.

Driven straight through the ledger API in the order the service and a pusher call it, so the
interleaving is exact (over sockets it only happens now and then).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jfsync.model import UserData
from jfsync.sync.ledger import Ledger
from jfsync.sync.merge import MergePolicy

pytestmark = pytest.mark.timeout(20)

USER = "name:alice"
ITEM = "0" * 31 + "1"
T0 = 1_750_000_000_000


async def ledger_with_history(tmp_path: Path) -> Ledger:
    """A ledger where a and b have the user and hold the item untouched."""
    ledger = await Ledger(tmp_path / "ledger.db", MergePolicy(servers=("a", "b"))).open()
    for server in ("a", "b"):
        await ledger.map_user(server, f"{server}-uid", USER)
        await ledger.apply_observation(server, USER, ITEM, UserData(favorite=True), T0)
    return ledger


async def test_undo_while_the_write_is_on_its_way_is_still_delivered(tmp_path: Path) -> None:
    ledger = await ledger_with_history(tmp_path)
    try:
        # a's user rates the item: b is owed the rating.
        await ledger.apply_observation("a", USER, ITEM, UserData(True, 5.0), T0 + 10)
        (row,) = await ledger.due_rows("b", 10, T0 + 20)
        current = UserData(favorite=True)
        (fresh,) = await ledger.observe_before_writes([(row, current)], T0 + 20)
        assert fresh is not None
        # While the write of 5.0 is on its way, a's user clears the rating again: b held no
        # rating, so nothing seems owed to b any more.
        await ledger.apply_observation("a", USER, ITEM, UserData(favorite=True), T0 + 30)
        # The write lands and is recorded: b now holds 5.0 and must be owed the clear.
        await ledger.rows_written([(fresh, fresh.intended(current))], T0 + 40)
        rows = await ledger.due_rows("b", 10, T0 + 50)
        assert [(r.desired.rating, set(r.registers)) for r in rows] == [(None, {"rating"})]
        assert await ledger.check_invariants() == []
    finally:
        await ledger.close()


async def test_intents_are_one_pending_echo_each_once_acked(tmp_path: Path) -> None:
    ledger = await ledger_with_history(tmp_path)
    try:
        await ledger.apply_observation("a", USER, ITEM, UserData(False, 5.0), T0 + 10)
        (row,) = await ledger.due_rows("b", 10, T0 + 20)
        current = UserData(favorite=True)
        (fresh,) = await ledger.observe_before_writes([(row, current)], T0 + 20)
        assert fresh is not None
        target = fresh.intended(current)
        await ledger.record_intents([(fresh, current, [target])], T0 + 21)
        # Before the ack the intent is pending, replacing what b held...
        (intent,) = await ledger.pending_echoes("b", USER, ITEM)
        assert (intent.state, intent.replaced, intent.written_ms) == (target, current, T0 + 21)
        await ledger.rows_written([(fresh, target)], T0 + 40)
        # ...and the ack leaves one entry, timed at the ack.
        (entry,) = await ledger.pending_echoes("b", USER, ITEM)
        assert (entry.state, entry.written_ms) == (target, T0 + 40)
        assert await ledger.due_rows("b", 10, T0 + 50) == []
    finally:
        await ledger.close()
