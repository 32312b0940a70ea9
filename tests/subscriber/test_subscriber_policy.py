"""Subscriber reconnect policy against a scripted peer: backoff, cooldown, auth, resync buffer.

These drive cases the emulator cannot script exactly (a peer that answers only some tokens,
raw bad frames) and assert the delays the subscriber asks the ManualClock for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from jfsync.sync.subscriber import (
    ConnectionStateChanged,
    LibraryChangedEvent,
    Subscriber,
    SubscriberState,
)
from jfsync.timing import ManualClock, backoff_delays
from tests.support.waiting import wait_until

from .helpers import RawConn, RawServer, Recorder, state

USER_ID = "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
OTHER_USER_ID = "0123456789abcdef0123456789abcdef"
SEASON_ID = "1b4f0e9851971998e732078544c96b36"
GOOD_TOKEN = "900d900d900d900d900d900d900d900d"
State = SubscriberState


def item_id(n: int) -> str:
    return f"{n:032x}"


def user_data_frame(n: int, *, user_id: str = USER_ID, with_season: bool = False) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [
        {
            "PlaybackPositionTicks": n,
            "PlayCount": n,
            "IsFavorite": n % 2 == 0,
            "Played": True,
            "ItemId": item_id(n),
        }
    ]
    if with_season:
        entries.append(
            {
                "UnplayedItemCount": 3,
                "PlaybackPositionTicks": 0,
                "PlayCount": 0,
                "IsFavorite": False,
                "Played": False,
                "ItemId": SEASON_ID,
            }
        )
    return {
        "MessageType": "UserDataChanged",
        "MessageId": f"{n:032x}",
        "Data": {"UserId": user_id, "UserDataList": entries},
    }


class Tokens:
    """A get_token callable that records how it was asked."""

    def __init__(self, plain: str = GOOD_TOKEN, fresh: str = GOOD_TOKEN) -> None:
        self.plain = plain
        self.fresh = fresh
        self.calls: list[bool] = []

    async def __call__(self, refresh: bool) -> str:
        self.calls.append(refresh)
        return self.fresh if refresh else self.plain


class Resyncs:
    """A resync hook that counts calls and can be held open by the test."""

    def __init__(self) -> None:
        self.count = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self) -> None:
        self.count += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()


def fixed_delays() -> Iterator[float]:
    """The capped exponential sequence without jitter: 1, 2, 4, 8, 8, ..."""
    return backoff_delays(base_s=1.0, cap_s=8.0, jitter=0.0)


MakeSubscriber = Callable[..., Subscriber]


@pytest.fixture
async def make_subscriber(clock: ManualClock, recorder: Recorder) -> AsyncIterator[MakeSubscriber]:
    made: list[Subscriber] = []

    def factory(
        url: str,
        *,
        tokens: Tokens | None = None,
        resync: Resyncs | None = None,
        delays: Callable[[], Iterator[float]] = fixed_delays,
        user_id: str = USER_ID,
    ) -> Subscriber:
        sub = Subscriber(
            "alpha",
            url,
            user_id,
            "alice",
            "jfsync-alpha-alice",
            get_token=tokens or Tokens(),
            on_event=recorder,
            resync=resync or Resyncs(),
            clock=clock,
            delays=delays,
        )
        made.append(sub)
        sub.start()
        return sub

    yield factory
    for sub in made:
        await sub.stop()


def current(sub: Subscriber) -> State:
    """The state now (a call, so type checkers do not carry narrowing across awaits)."""
    return sub.state


async def backoff_sleep(sub: Subscriber, clock: ManualClock) -> float:
    """The one delay a subscriber in BACKOFF asked the clock for."""
    await state(sub, State.BACKOFF)
    await clock.wait_for_sleepers(1)
    (delay,) = clock.pending_sleeps
    return delay


async def connected(sub: Subscriber, server: RawServer) -> RawConn:
    """Wait for CONNECTED and for the answer to the server's first ForceKeepAlive."""
    conn = await server.next_connection()
    await state(sub, State.CONNECTED)
    await wait_until(lambda: sub.socket is not None and sub.socket.keepalive_replies >= 1)
    return conn


async def test_backoff_is_capped_exponential_and_resets_after_a_healthy_connection(
    raw_server: RawServer,
    make_subscriber: MakeSubscriber,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="jfsync.sync.subscriber")
    await raw_server.stop()  # down from the start; the port stays ours
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, resync=resync)

    asked = []
    for _ in range(5):
        asked.append(await backoff_sleep(sub, clock))
        await clock.advance(asked[-1])
        await state(sub, State.BACKOFF, State.CONNECTING)
    assert asked == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert "cannot connect" in (sub.status.last_error or "")

    await raw_server.start()
    await clock.advance(await backoff_sleep(sub, clock))
    conn = await connected(sub, raw_server)
    assert resync.count == 1

    # One WARNING for the whole streak, DEBUG for repeats, INFO for the recovery.
    lines = [r for r in caplog.records if r.name == "jfsync.sync.subscriber"]
    failures = [r for r in lines if "cannot connect" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING] + [logging.DEBUG] * 5
    assert all("[alpha/alice]" in r.getMessage() for r in lines)
    recovery = [r for r in lines if "connected again after" in r.getMessage()]
    assert [r.levelno for r in recovery] == [logging.INFO]
    assert sub.status.last_error is None

    # Healthy for 60 s (keepalives answered all along), then dropped: backoff starts afresh.
    for _ in range(2):
        await clock.wait_for_sleepers(1)
        await clock.advance(30)
    await conn.close()
    assert await backoff_sleep(sub, clock) == 1.0
    await clock.advance(1.0)
    conn = await connected(sub, raw_server)
    assert resync.count == 2
    assert sub.status.reconnect_count == 1

    # Dropped again at once (not healthy): the sequence goes on instead of restarting.
    await conn.close()
    assert await backoff_sleep(sub, clock) == 2.0


async def test_jittered_default_delays_stay_within_the_spread(
    raw_server: RawServer, make_subscriber: MakeSubscriber, clock: ManualClock
) -> None:
    await raw_server.stop()
    sub = make_subscriber(raw_server.url, delays=backoff_delays)
    first = await backoff_sleep(sub, clock)
    await clock.advance(first)
    second = await backoff_sleep(sub, clock)
    assert 0.8 <= first <= 1.2
    assert 1.6 <= second <= 2.4


async def test_server_restarting_means_cooldown_then_reconnect_and_resync(
    raw_server: RawServer, make_subscriber: MakeSubscriber, clock: ManualClock, recorder: Recorder
) -> None:
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, resync=resync)
    conn = await connected(sub, raw_server)
    await conn.send({"MessageType": "ServerRestarting"})
    await state(sub, State.COOLDOWN)
    await clock.wait_for_sleepers(1)
    assert clock.pending_sleeps == [15.0]
    assert str(sub.status.pause_reason) == "the server is restarting"
    changes = [e for e in recorder.events if isinstance(e, ConnectionStateChanged)]
    assert changes[-1].reason == "the server is restarting"
    await wait_until(lambda: conn.ws.closed)  # we hung up ourselves; nothing more comes from it

    await clock.advance(14.9)
    assert current(sub) is State.COOLDOWN
    await clock.advance(0.1)
    await connected(sub, raw_server)
    assert resync.count == 2
    assert sub.status.pause_reason is None

    (conn,) = raw_server.all_connections[1:]
    await conn.send({"MessageType": "ServerShuttingDown"})
    await state(sub, State.COOLDOWN)
    await clock.wait_for_sleepers(1)
    assert clock.pending_sleeps == [15.0]


async def test_refused_token_is_reminted_once_and_the_new_one_connects(
    raw_server: RawServer, make_subscriber: MakeSubscriber, clock: ManualClock, recorder: Recorder
) -> None:
    raw_server.valid_tokens = {"fresh-token-1234"}
    tokens = Tokens(plain="revoked-token-1234", fresh="fresh-token-1234")
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, tokens=tokens, resync=resync)
    conn = await connected(sub, raw_server)
    assert tokens.calls == [False, True]
    assert conn.auth["Token"] == "fresh-token-1234"
    assert raw_server.upgrade_attempts == 2
    assert resync.count == 1
    # No pause on the way: straight from the refusal to a new token and a connection.
    assert recorder.states == [State.CONNECTING, State.RESYNCING, State.CONNECTED]
    await wait_until(lambda: clock.pending_sleeps == [30.0])  # only the keepalive timer


async def test_persistent_auth_failure_waits_slowly_with_a_visible_reason(
    raw_server: RawServer,
    make_subscriber: MakeSubscriber,
    clock: ManualClock,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw_server.valid_tokens = {"the-only-good-token"}
    tokens = Tokens(plain="bad-token-aaaa", fresh="bad-token-bbbb")
    sub = make_subscriber(raw_server.url, tokens=tokens)
    await state(sub, State.AUTH_FAILED)
    await clock.wait_for_sleepers(1)
    assert clock.pending_sleeps == [300.0]
    assert tokens.calls == [False, True]
    reason = sub.status.pause_reason
    assert reason is not None
    assert "refused alice's token even after minting a new one" in reason
    last = [e for e in recorder.events if isinstance(e, ConnectionStateChanged)][-1]
    assert (last.state, last.reason) == (State.AUTH_FAILED, reason)

    await clock.advance(299)
    assert current(sub) is State.AUTH_FAILED
    await clock.advance(1)
    await wait_until(lambda: len(tokens.calls) == 4)
    await state(sub, State.AUTH_FAILED)
    assert tokens.calls == [False, True, False, True]

    # Someone fixes the credentials: the next slow retry connects.
    raw_server.valid_tokens = {"bad-token-bbbb"}
    await clock.wait_for_sleepers(1)
    await clock.advance(300)
    await connected(sub, raw_server)
    assert sub.status.pause_reason is None
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(sub.status)
    for secret in ("bad-token-aaaa", "bad-token-bbbb", "the-only-good-token"):
        assert secret not in text


async def test_token_provider_failure_is_a_visible_auth_pause(
    raw_server: RawServer, make_subscriber: MakeSubscriber, clock: ManualClock
) -> None:
    from jfsync.errors import ServerError

    class NoQuickConnect(ServerError):
        pass

    async def get_token(refresh: bool) -> str:
        raise NoQuickConnect("alpha", "Quick Connect is disabled; set a token in the config")

    sub = Subscriber(
        "alpha",
        raw_server.url,
        USER_ID,
        "alice",
        "dev",
        get_token=get_token,
        on_event=Recorder(),
        resync=Resyncs(),
        clock=clock,
        delays=fixed_delays,
    )
    sub.start()
    try:
        await state(sub, State.AUTH_FAILED)
        reason = sub.status.pause_reason or ""
        assert "cannot get a token for alice" in reason
        assert "Quick Connect is disabled" in reason
        await clock.wait_for_sleepers(1)
        assert clock.pending_sleeps == [300.0]
        assert raw_server.upgrade_attempts == 0
    finally:
        await sub.stop()


async def test_a_websocket_route_that_is_not_there_is_retried_slowly(
    raw_server: RawServer, make_subscriber: MakeSubscriber, clock: ManualClock
) -> None:
    raw_server.valid_tokens = set()
    raw_server.reject_status = 404  # a wrong base URL, or a proxy without websocket support
    tokens = Tokens()
    sub = make_subscriber(raw_server.url, tokens=tokens)
    assert await backoff_sleep(sub, clock) == 300.0
    assert "the server refused the websocket" in (sub.status.pause_reason or "")
    assert "HTTP 404" in (sub.status.pause_reason or "")
    assert tokens.calls == [False]  # not an auth problem: no new token


async def test_events_during_resync_are_buffered_then_applied_in_order(
    raw_server: RawServer, make_subscriber: MakeSubscriber, recorder: Recorder
) -> None:
    resync = Resyncs()
    resync.gate = asyncio.Event()
    sub = make_subscriber(raw_server.url, resync=resync)
    conn = await raw_server.next_connection()
    await state(sub, State.RESYNCING)
    for n in (1, 2, 3):
        await conn.send(user_data_frame(n))
    await conn.send({"MessageType": "LibraryChanged", "Data": {"ItemsAdded": [item_id(9)]}})
    await wait_until(lambda: sub.status.buffered_events == 4)
    assert recorder.user_data == []
    assert current(sub) is State.RESYNCING

    resync.gate.set()
    await state(sub, State.CONNECTED)
    await recorder.wait_for(lambda evs: any(isinstance(e, LibraryChangedEvent) for e in evs))
    live = [e for e in recorder.events if not isinstance(e, ConnectionStateChanged)]
    assert [e.entries[0].item_id for e in recorder.user_data] == [item_id(n) for n in (1, 2, 3)]
    assert isinstance(live[-1], LibraryChangedEvent)
    assert live[-1].items_added == (item_id(9),)
    # Nothing was applied before the resync had finished.
    states = recorder.states
    first_live = recorder.events.index(live[0])
    assert State.CONNECTED in states
    assert (
        recorder.events.index(
            next(
                e
                for e in recorder.events
                if isinstance(e, ConnectionStateChanged) and e.state is State.CONNECTED
            )
        )
        < first_live
    )


async def test_user_data_events_mark_parent_folders_and_carry_domain_values(
    raw_server: RawServer, make_subscriber: MakeSubscriber, recorder: Recorder
) -> None:
    sub = make_subscriber(raw_server.url)
    conn = await connected(sub, raw_server)
    await conn.send(user_data_frame(4, with_season=True))
    (event,) = await recorder.wait_user_data(1)
    assert (event.server, event.user_id) == ("alpha", USER_ID)
    episode, season = event.entries
    assert (episode.item_id, episode.is_folder) == (item_id(4), False)
    assert episode.data.play_state.play_count == 4
    assert episode.data.favorite is True
    assert episode.data.play_state.position_ticks == 4
    assert (season.item_id, season.is_folder) == (SEASON_ID, True)
    assert event.item_entries == (episode,)
    assert sub.status.last_event_at_ms == sub._clock.wall_ms()


async def test_bad_frames_and_other_users_never_stop_the_subscriber(
    raw_server: RawServer,
    make_subscriber: MakeSubscriber,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A handler that fails ends the session instead: tests/subscriber/test_session_failures.py.
    sub = make_subscriber(raw_server.url)
    conn = await connected(sub, raw_server)
    await conn.send(user_data_frame(1))
    await conn.send("{{{ not json")
    await conn.send({"MessageType": "RefreshProgress", "Data": {"ItemId": "x"}})
    await conn.send(user_data_frame(2, user_id=OTHER_USER_ID))
    await conn.send({"MessageType": "UserDataChanged", "Data": {"UserId": 5}})
    await conn.send(user_data_frame(3))
    events = await recorder.wait_user_data(2)
    assert [e.entries[0].item_id for e in events] == [item_id(1), item_id(3)]
    assert current(sub) is State.CONNECTED
    assert len(raw_server.all_connections) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignored a UserDataChanged for another user" in m for m in messages)
    assert sum("skipped a websocket frame" in m for m in messages) == 2


async def test_half_open_peer_is_detected_by_keepalive_and_replaced(
    raw_server: RawServer, make_subscriber: MakeSubscriber, clock: ManualClock
) -> None:
    resync = Resyncs()
    sub = make_subscriber(raw_server.url, resync=resync)
    conn = await connected(sub, raw_server)
    conn.reply_keepalive = False
    await clock.wait_for_sleepers(1)
    await clock.advance(30)
    await clock.wait_for_sleepers(1)
    await clock.advance(19.9)
    assert current(sub) is State.CONNECTED
    await clock.advance(0.1)
    assert await backoff_sleep(sub, clock) == 1.0
    assert "no KeepAlive reply" in (sub.status.last_error or "")
    await clock.advance(1.0)
    fresh = await connected(sub, raw_server)
    assert fresh is not conn
    assert resync.count == 2


async def test_stop_closes_the_socket_and_ends_every_task(
    raw_server: RawServer, clock: ManualClock, recorder: Recorder
) -> None:
    sub = Subscriber(
        "alpha",
        raw_server.url,
        USER_ID,
        "alice",
        "dev",
        get_token=Tokens(),
        on_event=recorder,
        resync=Resyncs(),
        clock=clock,
    )
    assert current(sub) is State.IDLE
    sub.start()
    conn = await connected(sub, raw_server)
    await sub.stop()
    assert current(sub) is State.STOPPED
    assert recorder.states[-1] is State.STOPPED
    assert sub.socket is None
    await wait_until(lambda: conn.ws.closed)
    assert clock.pending_sleeps == []
    await sub.stop()  # idempotent
