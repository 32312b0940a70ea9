"""Rewatch protection in the pure merge: a playback un-play keeps Played, an explicit one does not.

Up to 10.11 a start un-plays a played item with PlayCount + 1 (fact sheet §3, Corrections 3);
the merge takes that as a 12.0 server would show it (played, with the new count, date and
position) and never writes the server that showed it; an explicit "mark unplayed" (PlayCount
0, no date) spreads as it is.
"""

from __future__ import annotations

import pytest

from jfsync.model import PlayState, Register, UserData
from jfsync.sync.merge import CanonicalState, MergePolicy, merge
from jfsync.sync.rewatch import is_playback_unplay, protected

PS = Register.PLAY_STATE
SERVERS = ("a", "b")
ON = MergePolicy(servers=SERVERS, rewatch_protection=True)
OFF = MergePolicy(servers=SERVERS, rewatch_protection=False)

WATCHED = PlayState(played=True, play_count=1, last_played_s=1_000, position_ticks=0)
#: What a 10.11 server shows right after the rewatch starts.
STARTED = PlayState(played=False, play_count=2, last_played_s=2_000, position_ticks=0)
#: ... and after the user stopped early.
STOPPED_EARLY = PlayState(played=False, play_count=2, last_played_s=2_000, position_ticks=9_000)
UNPLAYED = PlayState()


def _observe(
    policy: MergePolicy, canonical: PlayState, last_known: PlayState, incoming: PlayState
) -> tuple[PlayState, dict[str, frozenset[Register]]]:
    state = CanonicalState.first(UserData(play_state=canonical), ON.stamp(100, "a"), "a")
    result = merge(
        policy,
        canonical=state,
        last_known=UserData(play_state=last_known),
        incoming=UserData(play_state=incoming),
        stamp=policy.stamp(200, "a"),
        origin="a",
    )
    return result.canonical.data.play_state, dict(result.writes)


def test_a_rewatch_start_spreads_as_played_with_the_new_count_and_date() -> None:
    canonical, writes = _observe(ON, WATCHED, WATCHED, STARTED)
    assert canonical == PlayState(played=True, play_count=2, last_played_s=2_000)
    # The other server is told; the server the user is watching on is left alone.
    assert writes == {"b": frozenset({PS})}


def test_stopping_early_keeps_played_and_spreads_the_resume_position() -> None:
    during = protected(WATCHED, STARTED)
    canonical, writes = _observe(ON, during, STARTED, STOPPED_EARLY)
    assert canonical == PlayState(
        played=True, play_count=2, last_played_s=2_000, position_ticks=9_000
    )
    assert writes == {"b": frozenset({PS})}


def test_an_explicit_unplay_spreads_even_during_a_rewatch() -> None:
    during = protected(WATCHED, STOPPED_EARLY)
    canonical, writes = _observe(ON, during, STOPPED_EARLY, UNPLAYED)
    assert canonical == UNPLAYED
    assert writes == {"b": frozenset({PS})}


def test_finishing_the_rewatch_spreads_what_the_server_shows() -> None:
    finished = PlayState(played=True, play_count=2, last_played_s=2_000, position_ticks=0)
    canonical, _ = _observe(ON, protected(WATCHED, STOPPED_EARLY), STOPPED_EARLY, finished)
    assert canonical == finished


def test_with_the_option_off_the_unplay_spreads() -> None:
    canonical, writes = _observe(OFF, WATCHED, WATCHED, STARTED)
    assert canonical == STARTED
    assert writes == {"b": frozenset({PS})}


@pytest.mark.parametrize(
    ("canonical", "incoming", "expected"),
    [
        (WATCHED, STARTED, True),
        (WATCHED, UNPLAYED, False),  # mark unplayed: PlayCount 0
        (WATCHED, WATCHED, False),
        # Never finished: a partial watch is not a rewatch, whatever the count.
        (STOPPED_EARLY, STOPPED_EARLY, False),
        (UNPLAYED, STARTED, False),
    ],
)
def test_what_counts_as_a_playback_unplay(
    canonical: PlayState, incoming: PlayState, expected: bool
) -> None:
    assert is_playback_unplay(canonical, incoming) is expected
    assert (protected(canonical, incoming) != incoming) is expected


def test_an_unplay_without_a_date_or_with_an_older_one_is_not_a_rewatch() -> None:
    # A start always sets LastPlayedDate to now: an older or missing date is not a playback.
    no_date = PlayState(played=False, play_count=3, last_played_s=None, position_ticks=0)
    older = PlayState(played=False, play_count=3, last_played_s=500, position_ticks=0)
    assert not is_playback_unplay(WATCHED, no_date)
    assert not is_playback_unplay(WATCHED, older)
