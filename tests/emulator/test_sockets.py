"""Websocket behaviour of the emulator: who hears what, when, and the KeepAlive rules."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.timing import ManualClock
from tests.emulator.conftest import API_KEY, Http, MakeEmulator, auth_header, next_message
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(20)


async def assert_quiet(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Prove nothing was queued on the socket: a KeepAlive's reply is the next frame."""
    await ws.send_json({"MessageType": "KeepAlive"})
    reply = await next_message(ws)
    assert reply["MessageType"] == "KeepAlive", f"unexpected frame before the reply: {reply}"


def pushes(emu: Emulator, kind: str = "UserDataChanged") -> list[dict[str, Any]]:
    """Every message of ``kind`` the emulator has sent so far."""
    return [p for _, p in emu.hub.sent if p["MessageType"] == kind]


async def settle(emu: Emulator) -> None:
    """Wait until no push is pending or being sent."""
    await wait_until(lambda: not emu.pushes_pending)


async def open_user_socket(
    http: Http, name: str, device_id: str | None = None
) -> aiohttp.ClientWebSocketResponse:
    """Open a socket as ``name`` and consume the ForceKeepAlive sent on bind."""
    token = http.emu.user_token(name, device_id=f"login-{name}")
    ws = await http.ws(token, device_id=device_id or f"ws-{name}")
    first = await next_message(ws)
    assert first == {"MessageType": "ForceKeepAlive", "Data": 60, "MessageId": first["MessageId"]}
    return ws


@pytest.fixture
async def memu(make_emulator: MakeEmulator, clock: ManualClock) -> Emulator:
    """A 10.10.7 emulator on a manual clock."""
    return await make_emulator(clock=clock)


@pytest.fixture
def mhttp(session: aiohttp.ClientSession, memu: Emulator) -> Http:
    """HTTP helper for the manual-clock emulator."""
    return Http(session, memu)


async def test_bind_sends_force_keepalive_and_keepalive_is_answered(mhttp: Http) -> None:
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        await ws.send_json({"MessageType": "KeepAlive", "Data": ""})
        reply = await next_message(ws)
        assert reply["MessageType"] == "KeepAlive"
        assert len(reply["MessageId"]) == 32
        assert "Data" not in reply


async def test_a_user_socket_never_hears_another_user(mhttp: Http, clock: ManualClock) -> None:
    emu = mhttp.emu
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    ws_a = await open_user_socket(mhttp, "alice")
    ws_b = await open_user_socket(mhttp, "bob")
    async with ws_a, ws_b:
        reply = await mhttp.post(
            f"/UserItems/{movie.id}/UserData",
            params={"userId": bob},
            json_body={"IsFavorite": True},
        )
        assert reply.status == 200
        await clock.advance(0.5)
        message = await next_message(ws_b, "UserDataChanged")
        assert message["Data"]["UserId"] == bob
        await settle(emu)
        await assert_quiet(ws_a)
        emu.save_user_data(alice, movie.id, played=True)
        await clock.advance(0.5)
        message = await next_message(ws_a, "UserDataChanged")
        assert message["Data"]["UserId"] == alice
        await settle(emu)
        await assert_quiet(ws_b)


@pytest.mark.parametrize("version", ["10.10.7", "10.11.11"])
async def test_an_api_key_socket_hears_no_user_data(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock, version: str
) -> None:
    emu = await make_emulator(clock=clock, server_version=version)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    ws_key = await http.ws(API_KEY, device_id="jfsync-admin-socket")
    ws_alice = await open_user_socket(http, "alice")
    async with ws_key, ws_alice:
        if version == "10.11.11":
            # 10.11+: the API key gets a session with an empty user, hence a ForceKeepAlive.
            first = await next_message(ws_key)
            assert first["MessageType"] == "ForceKeepAlive"
            assert any(s.user_id is None for s in emu.hub.sessions.values())
        else:
            # 10.8-10.10: no session at all, so no ForceKeepAlive either.
            await assert_quiet(ws_key)
        for item in emu.leaf_items()[:3]:
            reply = await http.post(
                f"/UserFavoriteItems/{item.id}", params={"userId": alice}, token=API_KEY
            )
            assert reply.status == 200
        await clock.advance(0.5)
        heard = await next_message(ws_alice, "UserDataChanged")
        assert heard["Data"]["UserId"] == alice
        await settle(emu)
        await assert_quiet(ws_key)


async def test_ten_writes_give_one_message_after_500_ms_of_quiet(
    mhttp: Http, clock: ManualClock
) -> None:
    emu = mhttp.emu
    alice = emu.user_id("alice")
    season = next(
        i for i in emu.items if i.type == "Season" and len(emu.library.children(i.id)) >= 5
    )
    episodes = emu.library.children(season.id)[:5]
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        for n in range(10):
            item_id = episodes[n % 5]
            body = {"Played": True} if n < 5 else {"IsFavorite": True}
            reply = await mhttp.post(
                f"/UserItems/{item_id}/UserData", params={"userId": alice}, json_body=body
            )
            assert reply.status == 200
            if n < 9:
                await clock.advance(0.04)
        await clock.advance(0.499)
        assert pushes(emu) == [], "flushed before 500 ms of quiet"
        await clock.advance(0.001)
        message = await next_message(ws, "UserDataChanged")
        entries = {e["ItemId"]: e for e in message["Data"]["UserDataList"]}
        # Built at flush time: every episode shows both writes, plus the season parent entry.
        assert set(entries) == {*episodes, season.id}
        assert all(entries[e]["Played"] and entries[e]["IsFavorite"] for e in episodes)
        total = len(emu.library.children(season.id))
        assert entries[season.id]["UnplayedItemCount"] == total - 5
        assert "PlayedPercentage" not in entries[season.id]
        await settle(emu)
        await assert_quiet(ws)
        assert len(pushes(emu)) == 1


async def test_the_debounce_is_global_and_trailing(mhttp: Http, clock: ManualClock) -> None:
    emu = mhttp.emu
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    items = emu.leaf_items()
    ws_a = await open_user_socket(mhttp, "alice")
    ws_b = await open_user_socket(mhttp, "bob")
    async with ws_a, ws_b:
        emu.save_user_data(alice, items[0].id, is_favorite=True)
        await clock.advance(0.3)
        # Bob's save re-arms the ONE timer, postponing alice's push too.
        emu.save_user_data(bob, items[1].id, is_favorite=True)
        await clock.advance(0.3)
        assert pushes(emu) == []
        await clock.advance(0.2)
        got_a = await next_message(ws_a, "UserDataChanged")
        got_b = await next_message(ws_b, "UserDataChanged")
        assert got_a["Data"]["UserId"] == alice
        assert got_b["Data"]["UserId"] == bob
        assert got_a["MessageId"] != got_b["MessageId"]


async def test_a_no_op_write_still_echoes(mhttp: Http, clock: ManualClock) -> None:
    emu = mhttp.emu
    alice = emu.user_id("alice")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        for _ in range(2):
            reply = await mhttp.post(
                f"/UserItems/{movie.id}/UserData",
                params={"userId": alice},
                json_body={"IsFavorite": False, "Played": False},
            )
            assert reply.status == 200
            await clock.advance(0.5)
            message = await next_message(ws, "UserDataChanged")
            entry = next(e for e in message["Data"]["UserDataList"] if e["ItemId"] == movie.id)
            assert entry["IsFavorite"] is False
            # A movie's parent entry is its physical folder (a Folder, with UnplayedItemCount).
            assert any(
                e["ItemId"] == emu.library.movies_root.id for e in message["Data"]["UserDataList"]
            )


async def test_playback_progress_saves_but_never_pushes(mhttp: Http, clock: ManualClock) -> None:
    emu = mhttp.emu
    alice = emu.user_id("alice")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        emu.save_user_data(alice, movie.id, "PlaybackProgress", position_ticks=123)
        await clock.advance(1.0)
        await settle(emu)
        await assert_quiet(ws)
        assert emu.user_data(alice, movie.id).play_state.position_ticks == 123


async def test_a_user_without_a_session_loses_the_event(mhttp: Http, clock: ManualClock) -> None:
    emu = mhttp.emu
    alice = emu.user_id("alice")
    emu.save_user_data(alice, emu.leaf_items()[0].id, is_favorite=True)
    await clock.advance(0.5)
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        await clock.advance(0.5)
        await assert_quiet(ws)


async def test_one_session_reaches_only_its_most_recently_active_socket(
    mhttp: Http, clock: ManualClock
) -> None:
    emu = mhttp.emu
    alice = emu.user_id("alice")
    ws_old = await open_user_socket(mhttp, "alice", device_id="same-device")
    ws_new = await open_user_socket(mhttp, "alice", device_id="same-device")
    async with ws_old, ws_new:
        assert len(emu.hub.sessions) >= 1
        # The older socket speaks last, so it is the session's most recently active one.
        await assert_quiet(ws_old)
        emu.save_user_data(alice, emu.leaf_items()[0].id, is_favorite=True)
        await clock.advance(0.5)
        await next_message(ws_old, "UserDataChanged")
        await settle(emu)
        await assert_quiet(ws_new)


async def test_additional_users_widen_a_session(mhttp: Http, clock: ManualClock) -> None:
    emu = mhttp.emu
    bob = emu.user_id("bob")
    ws = await open_user_socket(mhttp, "alice", device_id="alice-socket")
    async with ws:
        sid = next(s.id for s in emu.hub.sessions.values() if s.device_id == "alice-socket")
        reply = await mhttp.post(f"/Sessions/{sid}/User/{bob}")
        assert reply.status == 204
        emu.save_user_data(bob, emu.leaf_items()[0].id, is_favorite=True)
        await clock.advance(0.5)
        message = await next_message(ws, "UserDataChanged")
        assert message["Data"]["UserId"] == bob
        own = await mhttp.post(f"/Sessions/{sid}/User/{emu.user_id('alice')}")
        assert own.status == 400


@pytest.mark.parametrize(("version", "closes"), [("10.10.7", False), ("12.0.0", True)])
async def test_keepalive_watchdog(
    make_emulator: MakeEmulator,
    session: aiohttp.ClientSession,
    clock: ManualClock,
    version: str,
    closes: bool,
) -> None:
    emu = await make_emulator(clock=clock, server_version=version)
    http = Http(session, emu)
    ws = await open_user_socket(http, "alice")
    async with ws:
        for _ in range(3):  # ticks at 12, 24, 36 s: not yet 45 s of silence
            await clock.advance(12)
        assert len(pushes(emu, "ForceKeepAlive")) == 1
        await clock.advance(12)  # 48 s: another ForceKeepAlive
        again = await next_message(ws)
        assert again["MessageType"] == "ForceKeepAlive"
        assert again["Data"] == 60
        await clock.advance(12)  # 60 s: lost
        if closes:
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            )
            await wait_until(lambda: emu.socket_count() == 0)
        else:
            # Up to 10.11 a lost socket is only unwatched: still open, still routed.
            assert emu.socket_count(emu.user_id("alice")) == 1
            await clock.advance(60)
            assert len(pushes(emu, "ForceKeepAlive")) == 2
            emu.save_user_data(emu.user_id("alice"), emu.leaf_items()[0].id, is_favorite=True)
            await clock.advance(0.5)
            await next_message(ws, "UserDataChanged")


async def test_keepalive_resets_the_watchdog(mhttp: Http, clock: ManualClock) -> None:
    emu = mhttp.emu
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        for _ in range(10):
            await clock.advance(12)
            await assert_quiet(ws)  # sends a KeepAlive, refreshing LastKeepAliveDate
        assert len(pushes(emu, "ForceKeepAlive")) == 1


async def test_invalid_inbound_json_is_logged_and_dropped(
    mhttp: Http, caplog: pytest.LogCaptureFixture
) -> None:
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        with caplog.at_level(logging.WARNING, logger="jfsync.emulator.sockets"):
            await ws.send_str("{not json")
            await ws.send_str('{"messagetype": "KeepAlive"}')  # keys are case-sensitive
            await assert_quiet(ws)
        assert "invalid websocket message" in caplog.text


@pytest.mark.parametrize("version", ["10.10.7", "10.11.11"])
async def test_device_id_query_names_the_session_only_up_to_10_10(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, version: str
) -> None:
    emu = await make_emulator(server_version=version)
    token = emu.user_token("alice", client="web", device_id="header-device")
    url = f"{emu.url}/socket?api_key={token}&deviceId=query-device"
    async with session.ws_connect(url) as ws:
        await next_message(ws, "ForceKeepAlive")
        devices = {s.device_id for s in emu.hub.sessions.values() if s.sockets}
        assert devices == ({"query-device"} if version == "10.10.7" else {"header-device"})


async def test_socket_upgrade_with_a_bad_token_is_403(
    http: Http, session: aiohttp.ClientSession
) -> None:
    for headers in ({}, auth_header("not-a-token")):
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(http.emu.url + "/socket", headers=headers)
        assert err.value.status == 403
    async with session.ws_connect(http.emu.url + f"/any/path/at/all?ApiKey={API_KEY}") as ws:
        await assert_quiet(ws)


async def test_v12_ignores_legacy_api_key_query(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await make_emulator(server_version="12.0.0")
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await session.ws_connect(f"{emu.url}/socket?api_key={API_KEY}")
    assert err.value.status == 403
    async with session.ws_connect(f"{emu.url}/socket?ApiKey={API_KEY}") as ws:
        # 12 gives API keys a session (empty user) like 10.11.
        assert (await next_message(ws))["MessageType"] == "ForceKeepAlive"


async def test_relogin_on_the_same_device_ends_the_old_session(
    mhttp: Http, session: aiohttp.ClientSession
) -> None:
    emu = mhttp.emu
    old = emu.user_token("alice", device_id="phone")
    ws = await mhttp.ws(old, device_id="phone")
    async with ws:
        await next_message(ws, "ForceKeepAlive")
        new = emu.user_token("alice", device_id="phone")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
    assert (await mhttp.get("/Users/Me", token=old)).status == 401
    assert (await mhttp.get("/Users/Me", token=new)).status == 200


async def test_library_changes_are_announced_to_user_sessions(
    mhttp: Http, clock: ManualClock
) -> None:
    emu = mhttp.emu
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        added = emu.add_item("Movie", "Brand New", year=2024, provider_ids={"Tmdb": "99"})
        victim = next(i for i in emu.leaf_items() if i.type == "Movie" and i.id != added.id)
        emu.remove_item(victim.id)
        await clock.advance(30)
        message = await next_message(ws, "LibraryChanged")
        data = message["Data"]
        assert data["ItemsAdded"] == [added.id]
        assert data["ItemsRemoved"] == [victim.id]
        assert data["FoldersAddedTo"] == [emu.library.movies_root.id]
        assert data["IsEmpty"] is False


async def test_server_message_broadcast(mhttp: Http) -> None:
    ws = await open_user_socket(mhttp, "alice")
    async with ws:
        assert await mhttp.emu.send_server_message("ServerRestarting") == 1
        assert (await next_message(ws))["MessageType"] == "ServerRestarting"


async def test_a_save_during_a_flush_is_flushed_after_its_own_quiet(clock: ManualClock) -> None:
    from jfsync.emulator.sockets import Debouncer

    flushed: list[float] = []
    gate = asyncio.Event()

    async def flush() -> None:
        flushed.append(clock.monotonic())
        if len(flushed) == 1:
            await gate.wait()  # a slow send

    debouncer = Debouncer(clock, 0.5, flush, "test-debouncer")
    try:
        debouncer.poke()
        await clock.advance(0.5)
        assert len(flushed) == 1
        debouncer.poke()  # arrives while the first flush is still sending
        gate.set()
        await clock.advance(0.499)
        assert len(flushed) == 1
        await clock.advance(0.001)
        assert len(flushed) == 2
        assert not debouncer.armed
    finally:
        await debouncer.close()
