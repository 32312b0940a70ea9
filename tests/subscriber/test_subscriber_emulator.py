"""Subscribers against the Jellyfin emulator over loopback: routing, restarts, half-open, auth.

Two ManualClocks: ``clock`` drives the subscribers (keepalive, backoff, cooldown) and
``emu_clock`` drives the emulator (its 500 ms debounce and watchdog), so each side's time
moves only when a test says so. Real time only bounds loopback I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.jellyfin.api import JellyfinClient
from jfsync.sync import subscriber as subscriber_module
from jfsync.sync.subscriber import (
    LibraryChangedEvent,
    Subscriber,
    SubscriberState,
    UserDataChangedEvent,
)
from jfsync.sync.tokens import MemoryTokenStore, UserTokens, user_device_id
from jfsync.timing import ManualClock, backoff_delays
from tests.support.waiting import wait_until

from .helpers import Recorder, state

State = SubscriberState
API_KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def emu_clock() -> ManualClock:
    """The emulator's own clock (debounce, watchdog)."""
    return ManualClock()


@pytest.fixture
async def emu(emu_clock: ManualClock) -> AsyncIterator[Emulator]:
    async with Emulator(
        api_key=API_KEY,
        users=[("alice", "secret"), ("bob", "secret")],
        library_size=30,
        seed=3,
        clock=emu_clock,
        server_name="alpha",
    ) as emulator:
        yield emulator


class EmuTokens:
    """get_token backed by emulator logins on the subscriber's own device id.

    ``refresh=False`` returns the cached token (which the test may have revoked);
    ``refresh=True`` logs in again, as re-minting does.
    """

    def __init__(self, emu: Emulator, name: str, device_id: str) -> None:
        self.emu = emu
        self.name = name
        self.device_id = device_id
        self.calls: list[bool] = []
        self.token = emu.user_token(name, client="jfsync", device_id=device_id)

    async def __call__(self, refresh: bool) -> str:
        self.calls.append(refresh)
        if refresh:
            self.token = self.emu.user_token(self.name, client="jfsync", device_id=self.device_id)
        return self.token


class Resyncs:
    """Counts resync calls; a test can hold one open with ``gate``."""

    def __init__(self) -> None:
        self.count = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> None:
        self.count += 1
        if self.gate is not None:
            await self.gate.wait()


def fixed_delays() -> Iterator[float]:
    return backoff_delays(base_s=1.0, cap_s=8.0, jitter=0.0)


class Watched:
    """One subscriber with its recorder, token source and resync counter."""

    def __init__(self, sub: Subscriber, recorder: Recorder, tokens: EmuTokens, resync: Resyncs):
        self.sub = sub
        self.recorder = recorder
        self.tokens = tokens
        self.resync = resync


Subscribe = Callable[..., Watched]


@pytest.fixture
async def subscribe(emu: Emulator, clock: ManualClock) -> AsyncIterator[Subscribe]:
    made: list[Subscriber] = []

    def factory(name: str, *, resync: Resyncs | None = None) -> Watched:
        user_id = emu.user_id(name)
        device_id = user_device_id(emu.server_id, user_id)
        recorder = Recorder()
        tokens = EmuTokens(emu, name, device_id)
        resync = resync or Resyncs()
        sub = Subscriber(
            "alpha",
            emu.url,
            user_id,
            name,
            device_id,
            get_token=tokens,
            on_event=recorder,
            resync=resync,
            clock=clock,
            delays=fixed_delays,
        )
        made.append(sub)
        sub.start()
        return Watched(sub, recorder, tokens, resync)

    yield factory
    for sub in made:
        await sub.stop()


async def live(sub: Subscriber, emu: Emulator) -> None:
    """Wait for CONNECTED with the emulator's socket bound and the first KeepAlive answered."""
    await state(sub, State.CONNECTED)
    await wait_until(lambda: sub.socket is not None and sub.socket.keepalive_replies >= 1)
    await wait_until(lambda: emu.socket_count(sub.user_id) >= 1)


async def flush(emu_clock: ManualClock) -> None:
    """Let the emulator's 500 ms trailing debounce fire."""
    await emu_clock.advance(0.5)


async def backoff_sleep(sub: Subscriber, clock: ManualClock) -> float:
    await state(sub, State.BACKOFF)
    await clock.wait_for_sleepers(1)
    (delay,) = clock.pending_sleeps
    return delay


def movie_ids(emu: Emulator) -> list[str]:
    return [i.id for i in emu.leaf_items() if i.type == "Movie"]


def episode(emu: Emulator) -> str:
    return next(i.id for i in emu.leaf_items() if i.type == "Episode")


def item_ids(event: UserDataChangedEvent) -> list[str]:
    return [e.item_id for e in event.item_entries]


async def test_each_user_hears_only_their_own_changes(
    emu: Emulator, emu_clock: ManualClock, subscribe: Subscribe
) -> None:
    alice, bob = subscribe("alice"), subscribe("bob")
    await live(alice.sub, emu)
    await live(bob.sub, emu)
    ep = episode(emu)
    one, two, three = movie_ids(emu)[:3]

    emu.save_user_data(alice.sub.user_id, ep, played=True, play_count=1)
    emu.save_user_data(bob.sub.user_id, one, is_favorite=True)
    await flush(emu_clock)
    (a_event,) = await alice.recorder.wait_user_data(1)
    (b_event,) = await bob.recorder.wait_user_data(1)
    assert (a_event.server, a_event.user_id) == ("alpha", emu.user_id("alice"))
    assert item_ids(a_event) == [ep]
    assert a_event.item_entries[0].data.play_state.played is True
    # The episode's season comes along as a parent folder entry, marked so it can be dropped.
    folders = [e for e in a_event.entries if e.is_folder]
    assert [f.item_id for f in folders] == [emu.item(ep).season_id]
    assert item_ids(b_event) == [one]
    assert b_event.item_entries[0].data.favorite is True

    # Barrier: a later change for each user. Had the other user's message reached the wrong
    # socket, it would have arrived on it before this one (one socket delivers in order).
    emu.save_user_data(alice.sub.user_id, two, rating=7.0)
    emu.save_user_data(bob.sub.user_id, three, rating=3.0)
    await flush(emu_clock)
    a_events = await alice.recorder.wait_user_data(2)
    b_events = await bob.recorder.wait_user_data(2)
    assert [item_ids(e) for e in a_events] == [[ep], [two]]
    assert [item_ids(e) for e in b_events] == [[one], [three]]
    assert a_events[1].item_entries[0].data.rating == 7.0


async def test_library_changes_reach_the_subscriber(
    emu: Emulator, emu_clock: ManualClock, subscribe: Subscribe
) -> None:
    alice = subscribe("alice")
    await live(alice.sub, emu)
    added = emu.add_item("Movie", "Brand New", year=2024)
    await emu.flush_now()
    await alice.recorder.wait_for(lambda evs: any(isinstance(e, LibraryChangedEvent) for e in evs))
    (event,) = [e for e in alice.recorder.events if isinstance(e, LibraryChangedEvent)]
    assert event.items_added == (added.id,)
    assert event.user_id == alice.sub.user_id


async def test_server_restart_is_reconnected_and_resynced_with_buffered_events_in_order(
    emu: Emulator, emu_clock: ManualClock, clock: ManualClock, subscribe: Subscribe
) -> None:
    alice = subscribe("alice")
    await live(alice.sub, emu)
    assert alice.resync.count == 1

    await emu.stop_listener()
    assert await backoff_sleep(alice.sub, clock) == 1.0
    await clock.advance(1.0)
    assert await backoff_sleep(alice.sub, clock) == 2.0  # still down: refused

    await emu.start_listener()
    alice.resync.gate = asyncio.Event()  # hold the next resync open
    await clock.advance(2.0)
    await state(alice.sub, State.RESYNCING)
    assert alice.resync.count == 2
    await wait_until(lambda: emu.socket_count(alice.sub.user_id) == 1)

    # Three separate pushes arrive while the resync runs: held back, then applied in order.
    ids = movie_ids(emu)[:3]
    for n, item_id in enumerate(ids, start=1):
        emu.save_user_data(alice.sub.user_id, item_id, play_count=n, played=True)
        await flush(emu_clock)
    await wait_until(lambda: alice.sub.status.buffered_events == 3)
    assert alice.recorder.user_data == []
    alice.resync.gate.set()
    events = await alice.recorder.wait_user_data(3)
    assert [item_ids(e) for e in events] == [[i] for i in ids]
    assert [e.item_entries[0].data.play_state.play_count for e in events] == [1, 2, 3]
    assert alice.sub.state is State.CONNECTED
    assert alice.sub.status.reconnect_count == 1


async def test_half_open_socket_is_detected_by_keepalive_and_replaced(
    emu: Emulator, emu_clock: ManualClock, clock: ManualClock, subscribe: Subscribe
) -> None:
    alice = subscribe("alice")
    await live(alice.sub, emu)
    first_socket = alice.sub.socket
    assert emu.half_open_sockets() == 1

    await clock.wait_for_sleepers(1)
    await clock.advance(30)  # KeepAlive sent into the void
    await clock.wait_for_sleepers(1)
    await clock.advance(19.9)
    assert alice.sub.state is State.CONNECTED
    await clock.advance(0.1)
    assert await backoff_sleep(alice.sub, clock) == 1.0
    assert "no KeepAlive reply" in (alice.sub.status.last_error or "")
    # The server lived through the same 50 s. It still counts the silent socket as open (it
    # never read our close), so it picks the session's most recently active one, as Jellyfin does.
    await emu_clock.advance(50)
    await clock.advance(1.0)
    await live(alice.sub, emu)
    assert alice.sub.socket is not first_socket
    assert alice.resync.count == 2

    # The replacement carries events again.
    movie = movie_ids(emu)[0]
    emu.save_user_data(alice.sub.user_id, movie, is_favorite=True)
    await flush(emu_clock)
    (event,) = await alice.recorder.wait_user_data(1)
    assert item_ids(event) == [movie]


async def test_revoked_token_is_reminted_and_the_subscription_works_again(
    emu: Emulator, emu_clock: ManualClock, clock: ManualClock, subscribe: Subscribe
) -> None:
    alice = subscribe("alice")
    await live(alice.sub, emu)
    assert alice.tokens.calls == [False]

    emu.revoke_token(alice.tokens.token)  # logout: the token dies and its sockets drop
    assert await backoff_sleep(alice.sub, clock) == 1.0
    await clock.advance(1.0)
    await live(alice.sub, emu)
    # The stale token got a 403 on the upgrade, so a new one was asked for, once.
    assert alice.tokens.calls == [False, False, True]
    assert alice.resync.count == 2

    movie = movie_ids(emu)[1]
    emu.save_user_data(alice.sub.user_id, movie, played=True)
    await flush(emu_clock)
    (event,) = await alice.recorder.wait_user_data(1)
    assert item_ids(event) == [movie]


async def test_persistent_auth_failure_is_auth_failed_with_a_slow_retry(
    emu: Emulator, clock: ManualClock
) -> None:
    calls: list[bool] = []

    async def never_valid(refresh: bool) -> str:
        calls.append(refresh)
        return "deadbeef" * 4

    recorder = Recorder()
    sub = Subscriber(
        "alpha",
        emu.url,
        emu.user_id("bob"),
        "bob",
        "jfsync-test-bob",
        get_token=never_valid,
        on_event=recorder,
        resync=Resyncs(),
        clock=clock,
    )
    sub.start()
    try:
        await state(sub, State.AUTH_FAILED)
        await clock.wait_for_sleepers(1)
        assert clock.pending_sleeps == [300.0]
        assert calls == [False, True]
        assert "refused bob's token" in (sub.status.pause_reason or "")
        assert "deadbeef" not in repr(sub.status)
        await clock.advance(300)
        await wait_until(lambda: len(calls) == 4)
        await state(sub, State.AUTH_FAILED)
    finally:
        await sub.stop()


async def test_keepalive_answers_force_keepalive_at_once_and_repeats_every_30_s(
    emu: Emulator, clock: ManualClock, subscribe: Subscribe
) -> None:
    start = clock.monotonic()
    alice = subscribe("alice")
    await live(alice.sub, emu)
    sock = alice.sub.socket
    assert sock is not None
    # The emulator's ForceKeepAlive on bind was answered without any time passing.
    assert sock.keepalives_sent == [start]
    for _ in range(3):
        await wait_until(lambda: clock.pending_sleeps == [30.0])
        await clock.advance(30)
        await wait_until(lambda: sock.keepalive_replies == len(sock.keepalives_sent))
    assert sock.keepalives_sent == [start, start + 30, start + 60, start + 90]
    assert alice.sub.state is State.CONNECTED


async def test_server_restarting_message_leads_to_cooldown(
    emu: Emulator, clock: ManualClock, subscribe: Subscribe
) -> None:
    alice = subscribe("alice")
    await live(alice.sub, emu)
    await emu.send_server_message("ServerRestarting")
    await state(alice.sub, State.COOLDOWN)
    await clock.wait_for_sleepers(1)
    assert clock.pending_sleeps == [15.0]
    await clock.advance(15)
    await live(alice.sub, emu)
    assert alice.resync.count == 2


async def test_tokens_minted_by_quick_connect_work_and_are_reminted_after_revocation(
    emu: Emulator, emu_clock: ManualClock, clock: ManualClock
) -> None:
    """The real token provider (Quick Connect with the admin key) behind a subscriber."""
    user_id = emu.user_id("bob")
    device_id = user_device_id(emu.server_id, user_id)
    store = MemoryTokenStore()
    recorder = Recorder()
    async with aiohttp.ClientSession() as session:
        client = JellyfinClient("alpha", emu.url, API_KEY, session=session, device_id="jfsync-rest")
        tokens = UserTokens(client, store, emu.server_id, {})
        asked: list[bool] = []

        async def get_token(refresh: bool) -> str:
            asked.append(refresh)
            return await tokens.token_for(user_id, "bob", refresh=refresh)

        sub = Subscriber(
            "alpha",
            emu.url,
            user_id,
            "bob",
            device_id,
            get_token=get_token,
            on_event=recorder,
            resync=Resyncs(),
            clock=clock,
            delays=fixed_delays,
        )
        sub.start()
        try:
            await state(sub, State.CONNECTED)
            first = await store.load_token(emu.server_id, user_id)
            assert first is not None
            emu.revoke_token(first)
            await clock.advance(await backoff_sleep(sub, clock))
            await state(sub, State.CONNECTED)
            assert asked == [False, False, True]
            second = await store.load_token(emu.server_id, user_id)
            assert second not in (None, first)

            movie = movie_ids(emu)[2]
            emu.save_user_data(user_id, movie, is_favorite=True)
            await flush(emu_clock)
            (event,) = await recorder.wait_user_data(1)
            assert item_ids(event) == [movie]
        finally:
            await sub.stop()


@pytest.mark.parametrize("version", ["10.9.11", "10.11.11", "12.0.0"])
async def test_other_supported_versions_deliver_events_and_keepalive(
    version: str, emu_clock: ManualClock, clock: ManualClock
) -> None:
    async with Emulator(
        api_key=API_KEY, library_size=10, seed=5, clock=emu_clock, server_version=version
    ) as other:
        user_id = other.user_id("alice")
        device_id = user_device_id(other.server_id, user_id)
        recorder = Recorder()
        sub = Subscriber(
            "other",
            other.url,
            user_id,
            "alice",
            device_id,
            get_token=EmuTokens(other, "alice", device_id),
            on_event=recorder,
            resync=Resyncs(),
            clock=clock,
        )
        sub.start()
        try:
            await live(sub, other)
            movie = movie_ids(other)[0]
            other.save_user_data(user_id, movie, played=True)
            await flush(emu_clock)
            (event,) = await recorder.wait_user_data(1)
            assert item_ids(event) == [movie]
        finally:
            await sub.stop()


async def test_a_bulk_message_is_handed_on_before_all_of_it_is_converted(
    emu: Emulator,
    emu_clock: ManualClock,
    subscribe: Subscribe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole library marked played in one action: one message, whose event comes with
    only its first step converted; the rest converts step by step to the same entries."""
    monkeypatch.setattr(subscriber_module, "ENTRIES_PER_STEP", 4)
    alice = subscribe("alice")
    await live(alice.sub, emu)
    leaves = [i.id for i in emu.leaf_items()]
    for item in leaves:
        emu.save_user_data(alice.sub.user_id, item, played=True, play_count=1)
    await flush(emu_clock)
    (event,) = await alice.recorder.wait_user_data(1)

    assert len(event.head) == 4
    assert event.rest, "the rest of the message is handed on unconverted"
    steps = [step async for step in event.item_steps()]
    assert all(len(step) <= 4 for step in steps)
    stepped = [entry for step in steps for entry in step]
    assert stepped == list(event.item_entries)
    assert sorted(e.item_id for e in stepped) == sorted(leaves)
    assert all(e.data.play_state.played for e in stepped)
