"""The write plan: exactly the requests a change needs, and the state after each one.

Each plan is checked against what a Jellyfin server does with those requests (protocol sheet
§4: the POST copies only the fields present, DELETE Rating clears the rating, DELETE
UserPlayedItems resets played, count, position and date), played out by :func:`serve` below,
not against the plan's own predictions. The client sends these plans to the emulator in
``test_api.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jfsync.jellyfin.writeplan import (
    CLEAR_RATING_ROUTE,
    MARK_UNPLAYED_ROUTE,
    USER_DATA_ROUTE,
    WritePlan,
    plan_write,
)
from jfsync.model import ALL_REGISTERS, PlayState, Register, UserData

T0 = 1_700_000_000
FAV, RATING, PLAY = Register.FAVORITE, Register.RATING, Register.PLAY_STATE
PLAYED = PlayState(played=True, play_count=2, last_played_s=T0, position_ticks=0)
RESUME = PlayState(played=False, play_count=1, last_played_s=T0 + 60, position_ticks=5_000_000)


def serve(state: UserData, method: str, route: str, body: bytes | None) -> UserData:
    """What Jellyfin 10.9-12 holds after one of the write requests (protocol sheet §4)."""
    if (method, route) == ("DELETE", CLEAR_RATING_ROUTE):
        return replace(state, rating=None)
    if (method, route) == ("DELETE", MARK_UNPLAYED_ROUTE):
        return replace(state, play_state=PlayState())
    assert (method, route) == ("POST", USER_DATA_ROUTE)
    assert body is not None
    fields = json.loads(body)
    ps = state.play_state
    date = fields.get("LastPlayedDate")
    return UserData(
        favorite=fields.get("IsFavorite", state.favorite),
        rating=fields.get("Rating", state.rating),
        play_state=PlayState(
            played=fields.get("Played", ps.played),
            play_count=fields.get("PlayCount", ps.play_count),
            last_played_s=ps.last_played_s
            if date is None
            else int(datetime.fromisoformat(date.replace("Z", "+00:00")).timestamp()),
            position_ticks=fields.get("PlaybackPositionTicks", ps.position_ticks),
        ),
    )


def sent(plan: WritePlan) -> list[tuple[str, str, dict[str, object] | None]]:
    """The plan's requests as (method, route, decoded body)."""
    return [
        (r.method, r.route, None if r.body is None else json.loads(r.body)) for r in plan.requests
    ]


def played_out(current: UserData, plan: WritePlan) -> UserData:
    """Send the plan to :func:`serve`; check each request's predicted state on the way."""
    state = current
    for request in plan.requests:
        state = serve(state, request.method, request.route, request.body)
        assert request.after == state
    assert plan.result == state
    return state


def test_favourite_is_one_post_of_that_field_only() -> None:
    plan = plan_write(UserData(), UserData(favorite=True), frozenset({FAV}))
    assert sent(plan) == [("POST", USER_DATA_ROUTE, {"IsFavorite": True})]
    assert played_out(UserData(), plan) == UserData(favorite=True)
    off = plan_write(UserData(favorite=True), UserData(), frozenset({FAV}))
    assert sent(off) == [("POST", USER_DATA_ROUTE, {"IsFavorite": False})]


def test_a_rating_is_posted_and_a_cleared_rating_is_deleted() -> None:
    assert sent(plan_write(UserData(rating=2.0), UserData(rating=9.5), frozenset({RATING}))) == [
        ("POST", USER_DATA_ROUTE, {"Rating": 9.5})
    ]
    # null in the body means "leave unchanged": clearing takes the DELETE route, and only it.
    clear = plan_write(UserData(rating=6.0), UserData(), frozenset({RATING}))
    assert sent(clear) == [("DELETE", CLEAR_RATING_ROUTE, None)]
    assert clear.steps == (UserData(),)
    assert played_out(UserData(rating=6.0), clear) == UserData()


def test_the_play_state_always_travels_whole() -> None:
    plan = plan_write(UserData(), UserData(play_state=PLAYED), frozenset({PLAY}))
    assert sent(plan) == [
        (
            "POST",
            USER_DATA_ROUTE,
            {
                "Played": True,
                "PlayCount": 2,
                "PlaybackPositionTicks": 0,
                "LastPlayedDate": "2023-11-14T22:13:20.0000000Z",
            },
        )
    ]
    # Only the count moves: the other three fields go with it, so the server never shows
    # the count of one write next to the date or position of another.
    more = replace(PLAYED, play_count=3)
    plan = plan_write(UserData(play_state=PLAYED), UserData(play_state=more), frozenset({PLAY}))
    assert sent(plan)[0][2] == {
        "Played": True,
        "PlayCount": 3,
        "PlaybackPositionTicks": 0,
        "LastPlayedDate": "2023-11-14T22:13:20.0000000Z",
    }


def test_a_resume_position_is_set_exactly_with_the_post() -> None:
    plan = plan_write(UserData(play_state=PLAYED), UserData(play_state=RESUME), frozenset({PLAY}))
    assert [(m, r) for m, r, _ in sent(plan)] == [("POST", USER_DATA_ROUTE)]
    assert played_out(UserData(play_state=PLAYED), plan) == UserData(play_state=RESUME)
    # Back to the start of the film, still with its history (date kept): one POST.
    start = replace(RESUME, position_ticks=0)
    plan = plan_write(UserData(play_state=RESUME), UserData(play_state=start), frozenset({PLAY}))
    assert sent(plan)[0][2] == {
        "Played": False,
        "PlayCount": 1,
        "PlaybackPositionTicks": 0,
        "LastPlayedDate": "2023-11-14T22:14:20.0000000Z",
    }


def test_unplayed_is_the_delete_alone() -> None:
    plan = plan_write(UserData(play_state=PLAYED), UserData(), frozenset({PLAY}))
    assert sent(plan) == [("DELETE", MARK_UNPLAYED_ROUTE, None)]
    assert played_out(UserData(play_state=PLAYED), plan) == UserData()


def test_a_date_going_to_none_deletes_first_then_posts_what_the_delete_reset() -> None:
    # The DELETE resets played, count, position and date; the count and position wanted are
    # then set again by the POST.
    wanted = PlayState(played=False, play_count=4, last_played_s=None, position_ticks=77)
    plan = plan_write(UserData(play_state=PLAYED), UserData(play_state=wanted), frozenset({PLAY}))
    assert sent(plan) == [
        ("DELETE", MARK_UNPLAYED_ROUTE, None),
        (
            "POST",
            USER_DATA_ROUTE,
            {"Played": False, "PlayCount": 4, "PlaybackPositionTicks": 77},
        ),
    ]
    assert plan.steps == (UserData(), UserData(play_state=wanted))
    # Played but with no date (as some imports leave it): still delete, then post.
    odd = PlayState(played=True, play_count=1, last_played_s=None, position_ticks=0)
    plan = plan_write(UserData(play_state=RESUME), UserData(play_state=odd), frozenset({PLAY}))
    assert [m for m, _, _ in sent(plan)] == ["DELETE", "POST"]
    assert played_out(UserData(play_state=RESUME), plan) == UserData(play_state=odd)


def test_everything_at_once_is_at_most_two_deletes_and_one_post() -> None:
    start = UserData(favorite=True, rating=3.0, play_state=RESUME)
    plan = plan_write(start, UserData(play_state=PlayState(play_count=1)), frozenset(ALL_REGISTERS))
    assert sent(plan) == [
        ("DELETE", CLEAR_RATING_ROUTE, None),
        ("DELETE", MARK_UNPLAYED_ROUTE, None),
        (
            "POST",
            USER_DATA_ROUTE,
            {"IsFavorite": False, "Played": False, "PlayCount": 1, "PlaybackPositionTicks": 0},
        ),
    ]
    assert plan.steps == (
        UserData(favorite=True, play_state=RESUME),
        UserData(favorite=True),
        UserData(play_state=PlayState(play_count=1)),
    )


def test_nothing_to_send_when_the_server_already_holds_it() -> None:
    state = UserData(favorite=True, rating=5.0, play_state=PLAYED)
    same = plan_write(state, state, frozenset(ALL_REGISTERS))
    assert same.nothing_to_send
    assert same.requests == ()
    assert same.steps == ()
    assert same.result == state
    # Registers not asked for are never written, whatever the wanted state holds for them.
    other = UserData(favorite=False, rating=None, play_state=PLAYED)
    assert plan_write(state, other, frozenset({PLAY})).nothing_to_send
    assert plan_write(state, other, frozenset()).nothing_to_send


def test_registers_not_asked_for_stay_out_of_the_body() -> None:
    start = UserData(favorite=True, rating=3.0)
    plan = plan_write(start, UserData(play_state=PLAYED), frozenset({PLAY}))
    [(method, _, body)] = sent(plan)
    assert method == "POST"
    assert body is not None
    assert set(body) == {"Played", "PlayCount", "PlaybackPositionTicks", "LastPlayedDate"}
    assert plan.result == UserData(favorite=True, rating=3.0, play_state=PLAYED)


ratings = st.none() | st.sampled_from([0.0, 1.0, 5.5, 10.0])
dates = st.none() | st.sampled_from([T0, T0 + 1, 0, -86_400])
play_states = st.builds(
    PlayState,
    played=st.booleans(),
    play_count=st.sampled_from([0, 1, 7]),
    last_played_s=dates,
    position_ticks=st.sampled_from([0, 1, 5_000_000]),
)
states = st.builds(UserData, favorite=st.booleans(), rating=ratings, play_state=play_states)
register_sets = st.frozensets(st.sampled_from(ALL_REGISTERS))


@pytest.mark.timeout(60)
@given(current=states, desired=states, registers=register_sets)
def test_any_plan_brings_exactly_the_registers_asked_for(
    current: UserData, desired: UserData, registers: frozenset[Register]
) -> None:
    plan = plan_write(current, desired, registers)
    result = played_out(current, plan)
    expected = current
    for register in registers:
        expected = expected.with_register(register, desired.get(register))
    assert result == expected
    # Minimal: nothing sent when nothing differs; a DELETE only for a value going to none;
    # at most one POST, last, and never for a register that already holds its value.
    differing = {r for r in registers if desired.get(r) != current.get(r)}
    assert plan.nothing_to_send == (not differing)
    methods = [r.method for r in plan.requests]
    assert methods.count("POST") <= 1
    assert "POST" not in methods[:-1]
    for request in plan.requests:
        assert request.sets <= differing
    deletes = {r.route for r in plan.requests if r.method == "DELETE"}
    assert (CLEAR_RATING_ROUTE in deletes) == (
        RATING in registers and desired.rating is None and current.rating is not None
    )
    assert (MARK_UNPLAYED_ROUTE in deletes) == (
        PLAY in registers
        and desired.play_state.last_played_s is None
        and current.play_state.last_played_s is not None
    )


def test_dates_are_written_the_way_jellyfin_writes_them() -> None:
    long_ago = datetime(1, 1, 1, tzinfo=UTC)
    seconds = int((long_ago - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    plan = plan_write(
        UserData(),
        UserData(play_state=PlayState(True, 1, seconds, 0)),
        frozenset({PLAY}),
    )
    [(_, _, body)] = sent(plan)
    assert body is not None
    assert body["LastPlayedDate"] == "0001-01-01T00:00:00.0000000Z"
