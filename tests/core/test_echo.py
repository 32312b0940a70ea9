"""The echo rule on its own: debounced echoes, stale echoes, reads, bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jfsync.model import PlayState, UserData
from jfsync.sync.echo import (
    ECHO_MAX_AGE_MS,
    ECHO_MAX_ENTRIES,
    PendingWrite,
    Verdict,
    after_read,
    classify_event,
    match_echo,
    prune,
    record_write,
)

W1 = UserData(favorite=True)
W2 = UserData(favorite=True, rating=7.0)
W3 = UserData(favorite=True, rating=7.0, play_state=PlayState(True, 1, 1_000, 0))
T = 1_000_000


S0 = UserData(play_state=PlayState(False, 1, 900, 42))


def written(
    *states: UserData, start_ms: int = T, first_over: UserData = S0
) -> tuple[PendingWrite, ...]:
    """Pending writes of ``states`` in order, each over the state before it."""
    pending: tuple[PendingWrite, ...] = ()
    replaced = first_over
    for offset, state in enumerate(states):
        pending = record_write(pending, state, start_ms + offset, replaced)
        replaced = state
    return pending


def test_echo_of_the_only_write_is_consumed() -> None:
    verdict = match_echo(written(W1), W1, T + 500)
    assert verdict.is_echo
    assert verdict.pending == ()


def test_debounced_echo_merging_several_writes_consumes_them_all() -> None:
    """Three quick writes, one flush: the echo carries the newest state."""
    verdict = match_echo(written(W1, W2, W3), W3, T + 600)
    assert verdict.is_echo
    assert verdict.pending == ()


def test_stale_echo_after_a_newer_write_keeps_the_newer_one_pending() -> None:
    pending = written(W1, W2)
    stale = match_echo(pending, W1, T + 500)
    assert stale.is_echo
    assert [p.state for p in stale.pending] == [W2]
    fresh = match_echo(stale.pending, W2, T + 700)
    assert fresh.is_echo
    assert fresh.pending == ()


def test_echo_carrying_a_user_change_is_not_an_echo() -> None:
    """The user changed the rating while our favourite write was debouncing."""
    mixed = UserData(favorite=True, rating=2.0)
    verdict = match_echo(written(W1), mixed, T + 500)
    assert not verdict.is_echo
    # The pending write stays: an echo of exactly W1 may still come (two flushes).
    assert [p.state for p in verdict.pending] == [W1]


def test_a_read_matches_without_consuming() -> None:
    pending = written(W1, W2)
    verdict = match_echo(pending, W2, T + 10, consume=False)
    assert verdict.is_echo
    assert verdict.pending == pending


def test_nothing_pending_means_a_real_change() -> None:
    verdict = match_echo((), W1, T)
    assert not verdict.is_echo
    assert verdict.pending == ()


def test_pending_states_expire_after_the_age_bound() -> None:
    pending = written(W1)
    assert match_echo(pending, W1, T + ECHO_MAX_AGE_MS).is_echo
    late = match_echo(pending, W1, T + ECHO_MAX_AGE_MS + 1)
    assert not late.is_echo
    assert late.pending == ()


def test_only_the_newest_entries_are_kept() -> None:
    states = [UserData(rating=float(i)) for i in range(ECHO_MAX_ENTRIES + 3)]
    pending = written(*states)
    assert len(pending) == ECHO_MAX_ENTRIES
    assert [p.state for p in pending] == states[-ECHO_MAX_ENTRIES:]
    assert not match_echo(pending, states[0], T + 100).is_echo


def test_a_wall_clock_jump_back_keeps_pending_states() -> None:
    pending = written(W1)
    assert prune(pending, T - 3_600_000) == pending


@given(st.lists(st.sampled_from([W1, W2, W3]), min_size=1, max_size=ECHO_MAX_ENTRIES), st.data())
def test_an_echo_consumes_its_oldest_match_and_everything_older(
    states: list[UserData], data: st.DataObject
) -> None:
    pending = written(*states)
    target = data.draw(st.sampled_from(states))
    oldest = min(i for i, s in enumerate(states) if s == target)
    verdict = match_echo(pending, target, T + 100)
    assert verdict.verdict is Verdict.ECHO
    assert list(verdict.pending) == list(pending[oldest + 1 :])


def test_a_repeated_state_does_not_swallow_the_echo_of_a_write_in_between() -> None:
    """Writes W1, W2, W1: the first W1 echo must leave W2 pending, or W2's echo is a change."""
    pending = written(W1, W2, W1)
    first = match_echo(pending, W1, T + 500)
    assert [p.state for p in first.pending] == [W2, W1]
    assert match_echo(first.pending, W2, T + 600).verdict is Verdict.ECHO


def test_an_event_flushed_before_a_write_is_stale_not_a_change() -> None:
    """The user's save on the target flushed just before our write; it arrives after the ack."""
    user_state = UserData(rating=4.0)
    pending = written(W1, first_over=user_state)
    verdict = match_echo(pending, user_state, T + 20)
    assert verdict.verdict is Verdict.STALE
    assert verdict.is_echo
    # The write's own echo is still expected.
    assert [p.state for p in verdict.pending] == [W1]
    assert match_echo(verdict.pending, W1, T + 520).verdict is Verdict.ECHO


def test_a_stale_event_consumes_only_entries_older_than_the_write_it_predates() -> None:
    pending = written(W1, W2, W3)
    verdict = match_echo(pending, S0, T + 10)  # S0 predates the first write: nothing goes
    assert verdict.verdict is Verdict.STALE
    assert verdict.pending == pending


# ---------------------------------------------------------------------- events: certain or not


def test_an_event_equal_to_the_newest_write_the_server_holds_is_a_certain_echo() -> None:
    pending = written(W1, W2)
    verdict = classify_event(pending, W2, W2, T + 600)
    assert verdict.verdict is Verdict.ECHO
    assert verdict.pending == ()


def test_an_event_equal_to_an_older_write_is_ambiguous_and_consumes_nothing() -> None:
    """A stale echo of W1, or the user setting W1 back after W2: only a read can tell."""
    pending = written(W1, W2)
    verdict = classify_event(pending, W1, W2, T + 600)
    assert verdict.verdict is Verdict.AMBIGUOUS
    assert verdict.pending == pending


def test_an_event_equal_to_what_a_write_replaced_is_ambiguous() -> None:
    """A stale event flushed before the write, or the user taking the write back."""
    pending = written(W1)
    assert classify_event(pending, S0, W1, T + 600).verdict is Verdict.AMBIGUOUS


def test_the_newest_write_after_a_user_change_is_not_taken_for_its_echo() -> None:
    """The user changed the item after the write (last-known moved): the same state again
    is not certainly the write's echo."""
    pending = written(W1)
    other = UserData(rating=3.0)
    assert classify_event(pending, W1, other, T + 600).verdict is Verdict.AMBIGUOUS


def test_any_other_event_is_a_change_and_nothing_pending_is_a_change() -> None:
    pending = written(W1)
    assert classify_event(pending, W3, W1, T + 600).verdict is Verdict.CHANGE
    assert classify_event((), W1, None, T).verdict is Verdict.CHANGE


def test_a_read_makes_older_entries_with_other_states_moot() -> None:
    pending = written(W1, W2, start_ms=T)
    # Read requested after both writes, showing W2: W1's echo can no longer come.
    assert [p.state for p in after_read(pending, W2, T + 500, T + 500)] == [W2]
    # Read showing something else: the user changed it; no entry can match an echo now.
    assert after_read(pending, W3, T + 500, T + 500) == ()
    # Entries recorded after the read was requested stay (their echo may still come).
    assert after_read(pending, W3, T + 1, T + 500) == pending[1:]


@given(
    states=st.lists(st.sampled_from([S0, W1, W2, W3]), min_size=1, max_size=6),
    incoming=st.sampled_from([S0, W1, W2, W3]),
    known=st.sampled_from([None, S0, W1, W2, W3]),
)
def test_an_echo_verdict_means_the_server_shows_jfsyncs_last_write(
    states: list[UserData], incoming: UserData, known: UserData | None
) -> None:
    """The only guess the rule makes is the safe one: an event called an echo equals both the
    newest write and what the ledger believes the server holds."""
    pending = written(*states)
    verdict = classify_event(pending, incoming, known, T + 100)
    if verdict.verdict is Verdict.ECHO:
        assert incoming == states[-1] == known
    if verdict.verdict is Verdict.CHANGE:
        assert all(incoming not in (p.state, p.replaced) for p in pending)
