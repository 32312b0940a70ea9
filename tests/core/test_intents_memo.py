"""The intents a compare records: each write's own steps, however its rows were made.

Before writing, the pusher records the states each write will leave on the peer (its intents),
so that the peer's echo of them is known as jfsync's own. A compare asks for them row by row,
and the steps are made once per distinct (peer state, wanted state, registers) by object
identity. A row's wanted state may be made and dropped within the compare (the ledger hands
back fresh rows): a state made later at the same address must still get its own steps, or the
echo of that write would be taken for the user's change (and copied back to every server).
"""

from __future__ import annotations

import gc

import pytest

from jfsync.jellyfin.writeplan import plan_write
from jfsync.model import PlayState, Register, UserData
from jfsync.sync.delivery import _steps_memo, write_steps
from jfsync.sync.ledger import OutboxRow

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000


def row(desired: UserData, registers: frozenset[Register]) -> OutboxRow:
    return OutboxRow(1, "b", "alice", "item", registers, desired, 1, 0, 0, 0, None, False)


def test_each_write_gets_its_own_steps_when_its_rows_come_and_go() -> None:
    steps = _steps_memo()
    peer = UserData(favorite=True, rating=6.0)
    both = frozenset({Register.PLAY_STATE, Register.RATING})
    for count in range(1, 400):
        # A new wanted state each time, dropped right after: CPython reuses its address.
        wanted = UserData(
            favorite=True,
            rating=None if count % 3 == 0 else float(count % 10),
            play_state=PlayState(True, count, T0 + count, 0)
            if count % 2
            else PlayState(False, 0, None, 0),
        )
        made = steps(row(wanted, both), peer)
        assert made == write_steps(peer, row(wanted, both)), count
        assert made[-1].play_state == wanted.play_state
        del wanted, made
        plan_write.cache_clear()  # the plan cache would keep the state alive otherwise
        gc.collect(0)


def test_the_same_write_over_the_same_state_is_planned_once() -> None:
    steps = _steps_memo()
    peer = UserData()
    wanted = UserData(play_state=PlayState(True, 1, T0, 0))
    regs = frozenset({Register.PLAY_STATE})
    first = steps(row(wanted, regs), peer)
    assert steps(row(wanted, regs), peer) is first
    assert first == [UserData(play_state=PlayState(True, 1, T0, 0))]
