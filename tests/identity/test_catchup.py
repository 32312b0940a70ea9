"""Nothing is lost in a gap: changes made while jfsync was stopped or a socket was down.

Jellyfin never replays what a closed socket missed (fact sheet §2.1), so jfsync scans each
user's non-default items after every (re)connect and at start, and diffs them against what it
last knew. These tests make changes while jfsync cannot hear them, on both servers, including
resets to the default (unplayed and unfavourited), and check the servers converge. An item
deleted from a server while jfsync was away is not a reset.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from jfsync.model import PlayState, UserData
from jfsync.sync.subscriber import SubscriberState
from jfsync.timing import ManualClock
from tests.identity.conftest import MakeStack, Stack, emulator

pytestmark = pytest.mark.timeout(40)

WHEN = datetime(2025, 3, 1, 20, 15, tzinfo=UTC)
PLAYED = UserData(play_state=PlayState(True, 1, int(WHEN.timestamp()), 0))
RESET: dict[str, Any] = {
    "is_favorite": False,
    "clear_rating": True,
    "played": False,
    "play_count": 0,
    "clear_last_played": True,
    "position_ticks": 0,
}


def matched_items(stack: Stack) -> list[tuple[str, str]]:
    return [(x.id, y.id) for x, y in stack.pairs("a", "b")]


async def test_changes_made_while_stopped_on_both_servers_converge_at_start(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack([emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")])
    items = matched_items(stack)
    (p_a, p_b), (f_a, f_b), (r_a, r_b), (n_a, n_b), (g_a, g_b), (d_a, d_b) = items[:6]
    # Known history, synced while jfsync runs.
    stack.change("a", p_a, played=True, play_count=1, last_played=WHEN)
    stack.change("b", f_b, is_favorite=True)
    stack.change("a", g_a, is_favorite=True)
    await stack.wait(
        lambda: (
            stack.holds("b", p_b, PLAYED)
            and stack.holds("a", f_a, UserData(favorite=True))
            and stack.holds("b", g_b, UserData(favorite=True))
        )
    )
    await stack.stop_service()

    # While jfsync is stopped: resets to default on both sides, new data on both sides, and
    # an item deleted from b.
    stack.change("b", p_b, **RESET)
    stack.change("a", f_a, **RESET)
    stack.change("a", r_a, rating=7.0)
    stack.change("b", n_b, position_ticks=9_000_000_000, play_count=2)
    stack.change("b", d_b, is_favorite=True)
    stack.emus["b"].remove_item(g_b)

    await stack.start_service()
    await stack.wait(
        lambda: (
            stack.holds("a", p_a, UserData())
            and stack.holds("b", f_b, UserData())
            and stack.holds("b", r_b, UserData(rating=7.0))
            and stack.holds("a", n_a, UserData(play_state=PlayState(False, 2, None, 9_000_000_000)))
            and stack.holds("a", d_a, UserData(favorite=True))
        )
    )
    # The deleted file is no reset: a keeps its favourite.
    assert stack.data("a", g_a) == UserData(favorite=True)
    assert stack.writes("a", {g_a}) == []


async def test_a_change_missed_while_a_socket_was_down_is_found_after_reconnect(
    make_stack: MakeStack,
) -> None:
    clock = ManualClock()
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], clock=clock
    )
    items = matched_items(stack)
    (x_a, x_b), (y_a, y_b) = items[:2]
    stack.change("a", x_a, is_favorite=True, rating=9.0)
    await stack.wait(lambda: stack.holds("b", x_b, UserData(favorite=True, rating=9.0)))

    subscribers = list(stack.svc().links["a"].subscribers.values())
    await stack.emus["a"].drop_sockets()
    await stack.wait(lambda: all(s.state is SubscriberState.BACKOFF for s in subscribers))
    # Both changes happen while a's sockets are down: the pushes go nowhere.
    stack.change("a", x_a, **RESET)
    stack.change("a", y_a, played=True, play_count=1, last_played=WHEN)
    await stack.emus["a"].flush_now()
    assert stack.data("b", x_b) == UserData(favorite=True, rating=9.0)
    assert stack.data("b", y_b) == UserData()

    await clock.advance(1.0)  # the reconnect delay passes; the resync scan finds both
    await stack.wait(lambda: stack.holds("b", x_b, UserData()) and stack.holds("b", y_b, PLAYED))
    assert all(s.state is SubscriberState.CONNECTED for s in subscribers)


async def test_a_reset_to_default_propagates_live(make_stack: MakeStack) -> None:
    stack = await make_stack([emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")])
    (x_a, x_b) = matched_items(stack)[3]
    stack.change("b", x_b, is_favorite=True, played=True, play_count=3, last_played=WHEN)
    expected = UserData(favorite=True, play_state=PlayState(True, 3, int(WHEN.timestamp()), 0))
    await stack.wait(lambda: stack.holds("a", x_a, expected))
    # The user resets it on a once jfsync's write there has echoed back (a user acting
    # within the 500 ms echo debounce of that write would look like a stale echo).
    ledger = stack.svc().ledger
    key = x_a  # a comes first in the config: its ids are the canonical keys

    async def echoed() -> bool:
        return not await ledger.pending_echoes("a", "name:alice", key)

    await stack.wait(echoed)
    stack.change("a", x_a, **RESET)
    await stack.wait(lambda: stack.holds("b", x_b, UserData()))


async def test_drift_no_event_reported_is_repaired_by_the_periodic_reconcile(
    make_stack: MakeStack,
) -> None:
    clock = ManualClock()
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")],
        # Shorter than any socket timer, so only the reconcile can notice the drift.
        sync={"reconcile_interval": "10s"},
        clock=clock,
    )
    (x_a, x_b) = matched_items(stack)[4]
    # Playback progress is saved but never pushed (fact sheet §3): drift jfsync cannot hear.
    stack.emus["b"].save_user_data(
        stack.emus["b"].user_id("alice"), x_b, "PlaybackProgress", position_ticks=4_200_000_000
    )
    await stack.emus["b"].flush_now()
    assert stack.data("a", x_a) == UserData()
    service = stack.svc()
    assert service.last_reconcile_ms is None
    await clock.advance(10.0)
    await stack.wait(
        lambda: stack.holds("a", x_a, UserData(play_state=PlayState(position_ticks=4_200_000_000)))
    )
    await stack.wait(lambda: service.last_reconcile_ms is not None)
    assert "1 changes found" in (service.last_reconcile_result or "")
    details = service.identity_details()["reconcile"]
    assert details["interval_s"] == 10.0
    assert details["last"]["changes"] == 1
