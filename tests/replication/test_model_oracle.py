"""The oracle of the model-based test on its own: which final values it accepts, and why.

Pure checks of :class:`tests.replication.model.Model` (no servers): a later round wins, the
same server's later action wins, actions of one round on different servers may resolve
either way, an action made after the server showed jfsync's write beats that write's source
(and only what every possible source is after when the value is ambiguous), and a wipe is no
action.
"""

from __future__ import annotations

import pytest

from jfsync.model import PlayState, Register, UserData
from tests.replication.model import Model

pytestmark = pytest.mark.timeout(10)

FAV = Register.FAVORITE
RATING = Register.RATING


def model() -> Model:
    m = Model(["a", "b", "c"])
    m.next_round()
    return m


def test_untouched_registers_must_hold_the_default() -> None:
    m = model()
    assert m.acceptable("alice", "x", FAV) == [False]
    assert m.acceptable("alice", "x", Register.PLAY_STATE) == [PlayState()]


def test_a_later_round_wins_over_any_server() -> None:
    m = model()
    m.record("a", "alice", "x", RATING, 3.0, "rate 3", "plain")
    m.next_round()
    m.record("b", "alice", "x", RATING, 7.0, "rate 7", "plain")
    assert m.acceptable("alice", "x", RATING) == [7.0]


def test_the_same_servers_later_action_wins_inside_a_round() -> None:
    m = model()
    m.record("a", "alice", "x", RATING, 3.0, "rate 3", "plain")
    m.record("a", "alice", "x", RATING, None, "clear rating", "plain")
    assert m.acceptable("alice", "x", RATING) == [None]


def test_one_round_on_two_servers_may_resolve_either_way_but_must_agree() -> None:
    m = model()
    m.record("a", "alice", "x", RATING, 3.0, "rate 3", "plain")
    m.record("b", "alice", "x", RATING, 7.0, "rate 7", "plain")
    assert m.acceptable("alice", "x", RATING) == [3.0, 7.0]
    agreeing = {s: {("alice", "x"): UserData(rating=7.0)} for s in "abc"}
    assert m.check(agreeing, ["alice"], ["x"]) == []
    split = {**agreeing, "c": {("alice", "x"): UserData(rating=3.0)}}
    (problem,) = m.check(split, ["alice"], ["x"])
    assert "servers disagree" in problem


def test_an_action_after_the_server_showed_jfsyncs_write_beats_it() -> None:
    m = model()
    m.record("a", "alice", "x", RATING, 3.0, "rate 3", "plain")
    m.jfsync_wrote("b", "alice", "x", UserData(rating=3.0))
    m.record("b", "alice", "x", RATING, None, "clear rating", "right after jfsync's write")
    assert m.acceptable("alice", "x", RATING) == [None]
    lost = {s: {("alice", "x"): UserData(rating=3.0)} for s in "abc"}
    (problem,) = m.check(lost, ["alice"], ["x"])
    assert "a user's action is lost" in problem


def test_an_action_before_jfsyncs_write_arrived_stays_concurrent() -> None:
    m = model()
    m.record("a", "alice", "x", RATING, 3.0, "rate 3", "plain")
    m.record("b", "alice", "x", RATING, 5.0, "rate 5", "plain")
    assert m.acceptable("alice", "x", RATING) == [3.0, 5.0]


def test_an_ambiguous_source_only_orders_what_every_source_is_after() -> None:
    m = model()
    m.record("a", "alice", "x", FAV, True, "favourite on", "plain")
    m.record("c", "alice", "x", FAV, True, "favourite on", "plain")
    # b shows True from jfsync: a's or c's action, nobody can tell which.
    m.jfsync_wrote("b", "alice", "x", UserData(favorite=True))
    m.record("b", "alice", "x", FAV, False, "favourite off", "right after jfsync's write")
    assert set(m.acceptable("alice", "x", FAV)) == {False, True}


def test_a_wipe_is_not_an_action() -> None:
    m = model()
    m.record("a", "alice", "x", FAV, True, "favourite on", "plain")
    m.jfsync_wrote("b", "alice", "x", UserData(favorite=True))
    m.next_round()
    m.wiped("b", ["alice"])
    assert m.acceptable("alice", "x", FAV) == [True]
    # The wiped server's default has no source: acting there orders nothing by causality.
    m.record("b", "alice", "x", FAV, True, "favourite on", "after the wipe")
    assert m.acceptable("alice", "x", FAV) == [True]
