"""A catch-up's diff taken in steps finds exactly what the one-pass diff finds.

The stepped diff (:func:`jfsync.sync.catchup.catchup_observations_in_steps`) gives the event
loop back between slices of a user's library; what it observes must not depend on where the
slices fall: a changed item, an item the server reset, nothing for an unchanged one.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfsync.model import DEFAULT_USER_DATA, PlayState, UserData
from jfsync.sync.catchup import catchup_observations, catchup_observations_in_steps

pytestmark = pytest.mark.timeout(30)

STATES = st.sampled_from(
    [
        DEFAULT_USER_DATA,
        UserData(favorite=True),
        UserData(play_state=PlayState(True, 1, 1_700_000_000, 0)),
        UserData(rating=7.0),
    ]
)
LIBRARY = st.dictionaries(st.sampled_from([f"item{n}" for n in range(40)]), STATES, max_size=40)


async def test_a_reset_a_change_and_an_unchanged_item_in_tiny_steps() -> None:
    favourite, played = UserData(favorite=True), UserData(play_state=PlayState(True, 1, 5, 0))
    known = {"kept": favourite, "reset": played, "was-default": DEFAULT_USER_DATA}
    scanned = {"kept": favourite, "changed": played}
    found = await catchup_observations_in_steps("b", "u", scanned, known, 10, 3, step=1)
    assert {(o.item, o.state) for o in found} == {
        ("changed", played),
        ("reset", DEFAULT_USER_DATA),
    }
    assert all(o.source == "scan" and o.wall_ms == 10 and o.read_seq == 3 for o in found)


@settings(max_examples=60, deadline=None)
@given(scanned=LIBRARY, known=LIBRARY, step=st.integers(min_value=1, max_value=50))
async def test_the_stepped_diff_equals_the_one_pass_diff(
    scanned: dict[str, UserData], known: dict[str, UserData], step: int
) -> None:
    whole = catchup_observations("b", "u", scanned, known, 10, 3)
    stepped = await catchup_observations_in_steps("b", "u", scanned, known, 10, 3, step=step)
    assert stepped == whole
