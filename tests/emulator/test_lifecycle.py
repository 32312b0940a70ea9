"""Credential and session lifecycle (fact sheet Corrections 1, 5, 6): Quick Connect mints at
Authorize, status codes for missing or foreign users, and the close a socket gets when its
session ends."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from jfsync.emulator import Emulator
from tests.emulator.conftest import Http, MakeEmulator, next_message

pytestmark = pytest.mark.timeout(20)


async def user_socket(http: Http, token: str, device_id: str) -> aiohttp.ClientWebSocketResponse:
    """A socket on ``device_id`` with the user's token, past its ForceKeepAlive."""
    ws = await http.ws(token, device_id=device_id)
    assert (await next_message(ws))["MessageType"] == "ForceKeepAlive"
    return ws


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """Wait for the socket to end; return (close code, reason)."""
    async with asyncio.timeout(5):
        msg = await ws.receive()
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.CLOSE:
        return int(msg.data), str(msg.extra or "")
    return ws.close_code, str(msg.extra or "")


async def test_quick_connect_mints_at_authorize_and_the_exchange_repeats(http: Http) -> None:
    emu = http.emu
    bob = emu.user_id("bob")
    started = await http.post("/QuickConnect/Initiate", token=None, device_id="qc-bob")
    secret, code = started.body["Secret"], started.body["Code"]
    exchange = {"Secret": secret}
    early = await http.post("/Users/AuthenticateWithQuickConnect", token=None, json_body=exchange)
    assert early.status == 404
    sessions_before = len(emu.hub.sessions)
    tokens_before = len(emu.tokens)
    ok = await http.post("/QuickConnect/Authorize", params={"code": code, "userId": bob})
    assert (ok.status, ok.body) == (200, True)
    # The token and its session exist now, before any exchange.
    assert len(emu.tokens) == tokens_before + 1
    assert len(emu.hub.sessions) == sessions_before + 1
    listed = await http.get("/Sessions")
    assert any(s["DeviceId"] == "qc-bob" and s["UserId"] == bob for s in listed.body)
    # Authorising the same code twice is a server error.
    twice = await http.post("/QuickConnect/Authorize", params={"code": code, "userId": bob})
    assert twice.status == 500
    first = await http.post("/Users/AuthenticateWithQuickConnect", token=None, json_body=exchange)
    second = await http.post("/Users/AuthenticateWithQuickConnect", token=None, json_body=exchange)
    assert first.status == second.status == 200
    assert first.body["AccessToken"] == second.body["AccessToken"]
    assert len(emu.tokens) == tokens_before + 1
    me = await http.get("/Users/Me", token=first.body["AccessToken"])
    assert me.body["Id"] == bob


async def test_authorize_closes_the_socket_already_open_for_that_device(http: Http) -> None:
    emu = http.emu
    bob = emu.user_id("bob")
    old = emu.user_token("bob", device_id="bob-phone")
    ws = await user_socket(http, old, "bob-phone")
    async with ws:
        started = await http.post("/QuickConnect/Initiate", token=None, device_id="bob-phone")
        authorized = await http.post(
            "/QuickConnect/Authorize", params={"code": started.body["Code"], "userId": bob}
        )
        assert authorized.status == 200
        code, reason = await closed(ws)
        assert (code, reason) == (1000, "System Shutdown")
    assert (await http.get("/Users/Me", token=old)).status == 401


@pytest.mark.parametrize(("version", "clean"), [("10.8.13", False), ("10.10.7", True)])
async def test_a_replaced_device_session_closes_with_system_shutdown(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, version: str, clean: bool
) -> None:
    emu = await make_emulator(server_version=version)
    http = Http(session, emu)
    old = emu.user_token("alice", device_id="alice-tv")
    ws = await user_socket(http, old, "alice-tv")
    async with ws:
        # Alice logs in again on the same device: the old token and its session end.
        emu.user_token("alice", device_id="alice-tv")
        code, reason = await closed(ws)
    if clean:
        assert (code, reason) == (1000, "System Shutdown")
    else:
        assert code != 1000


async def test_user_scoped_routes_without_a_user_are_400(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    for version, status in (("10.8.13", 404), ("10.10.7", 400), ("12.0.0", 400)):
        emu: Emulator = await make_emulator(server_version=version)
        http = Http(session, emu)
        movie = emu.leaf_items()[0]
        path = (
            f"/UserItems/{movie.id}/UserData"
            if version != "10.8.13"
            else f"/Users/{'0' * 32}/Items/{movie.id}"
        )
        reply = await http.get(path)
        assert reply.status == status, version
        if version != "10.8.13":
            assert (await http.get("/UserItems/Resume")).status == 400
            assert (await http.get("/Shows/NextUp")).status == 400
            assert (await http.post(f"/UserFavoriteItems/{movie.id}")).status == 400
            assert emu.writes[-1].status == 400


async def test_a_non_admin_asking_for_another_user_gets_403_before_404(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    bob_token = emu.user_token("bob")
    unknown = "f" * 32
    for method, path in (
        ("GET", f"/UserItems/{unknown}/UserData"),
        ("POST", f"/UserFavoriteItems/{unknown}"),
        ("POST", f"/UserPlayedItems/{unknown}"),
        ("GET", f"/Items/{unknown}"),
        ("GET", f"/Users/{alice}/Items/{unknown}"),
    ):
        reply = await http.call(method, path, token=bob_token, params={"userId": alice})
        assert reply.status == 403, (method, path, reply.status)
    # The admin key gets the 404 for the item; a malformed id is 400 for anyone.
    assert (
        await http.get(f"/UserItems/{unknown}/UserData", params={"userId": alice})
    ).status == 404
    reply = await http.get("/UserItems/nope/UserData", token=bob_token, params={"userId": alice})
    assert reply.status == 400
