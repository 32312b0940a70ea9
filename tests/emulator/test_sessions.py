"""Sessions as clients see them (issue item 9): capabilities, logout, pings, the /PlayingItems
routes, ``GET /Sessions`` while something plays and its filters, and the ``SessionsStart``
websocket feed."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.timing import ManualClock
from tests.emulator.conftest import API_KEY, Http, MakeEmulator, auth_header, next_message
from tests.emulator.test_sockets import assert_quiet

pytestmark = pytest.mark.timeout(20)


def a_movie(emu: Emulator) -> Any:
    """The first movie."""
    return next(i for i in emu.leaf_items() if i.type == "Movie")


async def session_of(http: Http, device_id: str, **params: str) -> dict[str, Any]:
    """The session of this test's client on ``device_id``, as ``GET /Sessions`` shows it
    (the login made another session: sessions are keyed by Client + DeviceId)."""
    reply = await http.get("/Sessions", params=params)
    assert reply.status == 200
    found = [s for s in reply.body if s["DeviceId"] == device_id and s["Client"] == "emu-test"]
    assert len(found) == 1, reply.body
    return dict(found[0])


async def test_capabilities_land_on_the_callers_session(http: Http) -> None:
    token = http.emu.user_token("bob", device_id="bob-tv")
    reply = await http.post(
        "/Sessions/Capabilities",
        token=token,
        device_id="bob-tv",
        params={
            "playableMediaTypes": "Video,Hologram",
            "supportedCommands": "DisplayMessage,Teleport,SetVolume",
            "supportsMediaControl": "true",
        },
    )
    assert reply.status == 204
    session = await session_of(http, "bob-tv")
    assert session["PlayableMediaTypes"] == ["Video"]
    assert session["SupportedCommands"] == ["DisplayMessage", "SetVolume"]
    assert session["SupportsMediaControl"] is True
    full = await http.post(
        "/Sessions/Capabilities/Full",
        token=token,
        device_id="bob-tv",
        json_body={"PlayableMediaTypes": ["Audio"], "SupportedCommands": ["Play"]},
    )
    assert full.status == 204
    session = await session_of(http, "bob-tv")
    assert (session["PlayableMediaTypes"], session["SupportedCommands"]) == (["Audio"], ["Play"])
    assert session["Capabilities"]["SupportsMediaControl"] is False
    unknown = await http.post("/Sessions/Capabilities", params={"id": "f" * 32})
    assert unknown.status == 404


async def test_logout_ends_the_token_and_its_socket(http: Http) -> None:
    token = http.emu.user_token("bob", device_id="bob-phone")
    ws = await http.ws(token, device_id="bob-phone")
    async with ws:
        assert (await next_message(ws))["MessageType"] == "ForceKeepAlive"
        reply = await http.post("/Sessions/Logout", token=token, device_id="bob-phone")
        assert reply.status == 204
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1000, "System Shutdown")
    assert (await http.get("/Users/Me", token=token)).status == 401
    assert all(s["DeviceId"] != "bob-phone" for s in (await http.get("/Sessions")).body)


async def test_sessions_show_what_plays_and_where(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    runtime = movie.run_time_ticks or 0
    token = emu.user_token("alice", device_id="alice-tv")

    async def as_alice(method: str, path: str, **kwargs: Any) -> int:
        reply = await http.call(method, path, token=token, device_id="alice-tv", **kwargs)
        return reply.status

    assert await as_alice("POST", "/Sessions/Playing/Ping") == 204
    idle = await session_of(http, "alice-tv")
    assert "NowPlayingItem" not in idle
    assert idle["LastPlaybackCheckIn"] == "0001-01-01T00:00:00.0000000Z"
    assert await as_alice("POST", "/Sessions/Playing", json_body={"ItemId": movie.id}) == 204
    await clock.advance(10)
    body = {"ItemId": movie.id, "PositionTicks": runtime // 3, "IsPaused": True}
    assert await as_alice("POST", "/Sessions/Playing/Progress", json_body=body) == 204
    playing = await session_of(http, "alice-tv")
    assert playing["NowPlayingItem"]["Id"] == movie.id
    assert playing["PlayState"]["PositionTicks"] == runtime // 3
    assert playing["PlayState"]["IsPaused"] is True
    assert playing["LastPlaybackCheckIn"] != idle["LastPlaybackCheckIn"]
    assert playing["UserId"] == alice
    assert await as_alice("POST", "/Sessions/Playing/Ping", params={"playSessionId": "x"}) == 204
    body = {"ItemId": movie.id, "PositionTicks": runtime // 2}
    assert await as_alice("POST", "/Sessions/Playing/Stopped", json_body=body) == 204
    stopped = await session_of(http, "alice-tv")
    assert "NowPlayingItem" not in stopped
    assert emu.user_data(alice, movie.id).play_state.position_ticks == runtime // 2


async def test_playing_items_routes_report_playback(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    runtime = movie.run_time_ticks or 0
    token = emu.user_token("alice", device_id="alice-pc")
    call = {"token": token, "device_id": "alice-pc"}
    start = await http.post(
        f"/PlayingItems/{movie.id}", params={"playMethod": "DirectPlay"}, **call
    )
    assert start.status == 204
    assert emu.user_data(alice, movie.id).play_state.play_count == 1
    progress = await http.post(
        f"/PlayingItems/{movie.id}/Progress", params={"positionTicks": str(runtime // 4)}, **call
    )
    assert progress.status == 204
    playing = await session_of(http, "alice-pc")
    assert playing["PlayState"]["PositionTicks"] == runtime // 4
    assert playing["PlayState"]["PlayMethod"] == "DirectPlay"
    stopped = await http.delete(
        f"/PlayingItems/{movie.id}", params={"positionTicks": str(runtime * 95 // 100)}, **call
    )
    assert stopped.status == 204
    state = emu.user_data(alice, movie.id).play_state
    assert (state.played, state.position_ticks) == (True, 0)
    assert "NowPlayingItem" not in await session_of(http, "alice-pc")
    legacy = await http.post(f"/Users/{alice}/PlayingItems/{movie.id}", **call)
    assert legacy.status == 204
    negative = await http.delete(
        f"/PlayingItems/{movie.id}", params={"positionTicks": "-1"}, **call
    )
    assert negative.status == 400


async def test_session_filters(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    bob = emu.user_id("bob")
    emu.user_token("alice", device_id="alice-old")
    await clock.advance(600)
    bob_token = emu.user_token("bob", device_id="bob-new")
    await http.post(
        "/Sessions/Capabilities",
        token=bob_token,
        device_id="bob-new",
        params={"supportsMediaControl": "true"},
    )

    async def devices(**params: str) -> set[str]:
        reply = await http.get("/Sessions", params=params)
        return {s["DeviceId"] for s in reply.body}

    assert {"alice-old", "bob-new"} <= await devices()
    assert await devices(deviceId="bob-new") == {"bob-new"}
    assert "alice-old" not in await devices(activeWithinSeconds="60")
    assert "bob-new" in await devices(activeWithinSeconds="60")
    # Only sessions that accept remote control, and for a non-admin only their own.
    assert await devices(controllableByUserId=bob) == {"bob-new"}
    # A user sees only sessions that contain them.
    mine = await http.get("/Sessions", token=bob_token, device_id="bob-new")
    assert {s["DeviceId"] for s in mine.body} == {"bob-new"}


@pytest.mark.parametrize(
    ("version", "admin_user", "api_key", "plain_user"),
    [
        ("10.8.13", True, True, True),
        ("10.10.7", True, False, False),
        ("10.11.11", True, True, True),
    ],
)
async def test_sessions_feed_is_periodic_and_version_gated(
    make_emulator: MakeEmulator,
    session: aiohttp.ClientSession,
    clock: ManualClock,
    version: str,
    admin_user: bool,
    api_key: bool,
    plain_user: bool,
) -> None:
    emu = await make_emulator(clock=clock, server_version=version)
    http = Http(session, emu)
    alice_token = emu.user_token("alice", device_id="alice-login")  # alice is the admin
    bob_token = emu.user_token("bob", device_id="bob-login")

    cases = [(alice_token, admin_user, "a"), (API_KEY, api_key, "k"), (bob_token, plain_user, "b")]
    for token, allowed, tag in cases:
        headers = auth_header(token, client="feed-test", device_id=f"feed-{tag}")
        async with session.ws_connect(emu.url + "/socket", headers=headers) as ws:
            # Up to 10.10 an API-key socket gets no session, hence no ForceKeepAlive.
            if not (token == API_KEY and version in ("10.8.13", "10.10.7")):
                assert (await next_message(ws))["MessageType"] == "ForceKeepAlive"
            await ws.send_json({"MessageType": "SessionsStart", "Data": "0,1500"})
            if not allowed:
                await clock.advance(2)
                await assert_quiet(ws)
                continue
            first = await next_message(ws, "Sessions")
            await clock.advance(1.5)
            second = await next_message(ws, "Sessions")
            assert first["MessageId"] != second["MessageId"]
            ids = {s["DeviceId"] for s in second["Data"]}
            if token == bob_token and version == "10.11.11":
                # From 10.11 a non-admin sees only their own sessions.
                assert "bob-login" in ids
                assert "alice-login" not in ids
            else:
                assert "alice-login" in ids
                assert "bob-login" in ids
            await ws.send_json({"MessageType": "SessionsStop"})
            await assert_quiet(ws)
            await clock.advance(3)
            await assert_quiet(ws)
    assert http.emu is emu


async def test_the_sessions_feed_also_sends_on_playback_events(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    movie = a_movie(emu)
    admin = emu.user_token("alice", device_id="alice-admin")
    headers = auth_header(admin, client="feed-test", device_id="feed-admin")
    async with session.ws_connect(emu.url + "/socket", headers=headers) as ws:
        assert (await next_message(ws))["MessageType"] == "ForceKeepAlive"
        # A period of an hour: anything sent before that is event-driven.
        await ws.send_json({"MessageType": "SessionsStart", "Data": "0,3600000"})
        await next_message(ws, "Sessions")
        bob = emu.user_token("bob", device_id="bob-tv")
        reply = await http.post(
            "/Sessions/Playing", token=bob, device_id="bob-tv", json_body={"ItemId": movie.id}
        )
        assert reply.status == 204
        playing: list[dict[str, Any]] = []
        while not playing:
            message = await next_message(ws, "Sessions")
            playing = [s for s in message["Data"] if "NowPlayingItem" in s]
        assert playing[0]["NowPlayingItem"]["Id"] == movie.id
        assert playing[0]["DeviceId"] == "bob-tv"
        await ws.send_json({"MessageType": "SessionsStop"})
