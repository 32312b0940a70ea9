"""The emulator's test controls, from Python and over ``/__emulator__``, and its command line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from jfsync.emulator import Emulator, request_observers
from jfsync.emulator.state import RequestRecord
from jfsync.timing import ManualClock
from tests.emulator.conftest import API_KEY, USERS, Http, MakeEmulator, next_message
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


async def test_stop_and_start_listener_keeps_port_and_state(
    http: Http, session: aiohttp.ClientSession
) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = emu.leaf_items()[0]
    token = emu.user_token("alice")
    port = emu.port
    ws = await http.ws(token)
    async with ws:
        await next_message(ws, "ForceKeepAlive")
        await emu.stop_listener()
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get("/System/Info/Public")
    emu.save_user_data(alice, movie.id, is_favorite=True)
    await emu.start_listener()
    assert emu.port == port
    reply = await http.get(f"/UserItems/{movie.id}/UserData", params={"userId": alice}, token=token)
    assert reply.status == 200
    assert reply.body["IsFavorite"] is True
    assert emu.socket_count() == 0


async def test_fail_next_writes(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = emu.leaf_items()[0]
    emu.fail_next_writes(2, 503)
    path = f"/UserItems/{movie.id}/UserData"
    for _ in range(2):
        reply = await http.post(path, params={"userId": alice}, json_body={"IsFavorite": True})
        assert reply.status == 503
        # Reads are not writes: they keep working.
        assert (await http.get(path, params={"userId": alice})).body["IsFavorite"] is False
    assert (
        await http.post(path, params={"userId": alice}, json_body={"IsFavorite": True})
    ).status == 200
    assert [w.status for w in emu.writes] == [503, 503, 200]
    assert emu.writes[0].body == {"IsFavorite": True}


async def test_latency_uses_the_injected_clock(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    emu.set_latency(2.0)
    call = asyncio.create_task(http.get("/System/Info/Public"), name="slow-call")
    try:
        await clock.wait_for_sleepers(1)
        await clock.advance(1.9)
        assert not call.done()
        await clock.advance(0.1)
        assert (await asyncio.wait_for(call, 5)).status == 200
    finally:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)


async def test_drop_sockets_closes_them(http: Http) -> None:
    ws = await http.ws(http.emu.user_token("bob"))
    async with ws:
        await next_message(ws, "ForceKeepAlive")
        await http.emu.drop_sockets()
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 1001


async def test_half_open_sockets_go_silent_without_closing(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    ws = await http.ws(emu.user_token("alice"))
    await next_message(ws, "ForceKeepAlive")
    assert emu.half_open_sockets() == 1
    conn = emu.hub.sockets[0]
    assert conn.request.transport is not None
    assert not conn.request.transport.is_reading()
    sent_before = len(emu.hub.sent)
    await ws.send_json({"MessageType": "KeepAlive"})
    emu.save_user_data(alice, emu.leaf_items()[0].id, is_favorite=True)
    await clock.advance(0.5)
    await clock.advance(48)
    # The server still believes the socket is open, but nothing reaches it.
    assert emu.socket_count(alice) == 1
    assert not ws.closed
    assert len(emu.hub.sent) == sent_before
    # A close handshake would wait for a reply that never comes: drop the server side first.
    await emu.stop_listener()
    await ws.close()


async def test_http_controls(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie = emu.leaf_items()[0]
    state = await http.get("/__emulator__/state", headers={})
    assert state.body["users"]["alice"] == alice
    assert (
        await http.post("/__emulator__/fail-writes", params={"count": "1", "status": "404"})
    ).status == 200
    failed = await http.post(f"/UserFavoriteItems/{movie.id}", params={"userId": alice})
    assert failed.status == 404
    saved = await http.post(
        f"/__emulator__/user-data/{alice}/{movie.id}",
        json_body={"played": True, "play_count": 3, "last_played": "2025-01-01T00:00:00Z"},
    )
    assert (saved.body["played"], saved.body["play_count"]) == (True, 3)
    added = await http.post(
        "/__emulator__/items", json_body={"type": "Movie", "name": "Extra", "year": 2020}
    )
    new_id = added.body["id"]
    assert emu.item(new_id).name == "Extra"
    moved = await http.post(
        f"/__emulator__/items/{new_id}/move", params={"path": "/media/x/Extra.mkv"}
    )
    assert moved.body["path"] == "/media/x/Extra.mkv"
    assert (await http.delete(f"/__emulator__/items/{moved.body['id']}")).status == 200
    await http.post("/__emulator__/debounce", params={"seconds": "2"})
    assert emu.hub.debounce_s == 2
    await http.post("/__emulator__/quick-connect", params={"enabled": "false"})
    assert emu.quick_connect_enabled is False
    assert (await http.post("/__emulator__/nonsense")).status == 404
    assert all(r.is_control and r.route is None for r in emu.requests if "__emulator__" in r.path)
    restart = await http.post("/__emulator__/restart", params={"down_s": "5"})
    assert restart.status == 200
    # Down, and parked on the manual clock for the 5 s downtime.
    await wait_until(lambda: not emu.is_listening and 5.0 in clock.pending_sleeps, 5)
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get("/System/Info/Public")
    await clock.advance(5)
    await wait_until(lambda: emu.is_listening, 5)
    assert (await http.get("/System/Info/Public")).status == 200


async def test_request_observers_see_every_request(http: Http) -> None:
    seen: list[tuple[Emulator, RequestRecord]] = []

    def observe(emu: Emulator, record: RequestRecord) -> None:
        seen.append((emu, record))

    request_observers.append(observe)
    try:
        alice = http.emu.user_id("alice")
        await http.get("/Items", params={"userId": alice, "Recursive": "true"})
        await http.get(f"/Users/{alice}/Items", params={"Recursive": "true"})
    finally:
        request_observers.remove(observe)
    assert [(r.route, r.is_legacy, r.client, r.status) for _, r in seen] == [
        ("/Items", False, "emu-test", 200),
        (None, True, "emu-test", 200),
    ]
    assert seen[0][1].query == {"userId": [alice], "Recursive": ["true"]}
    assert seen[0][0] is http.emu


@pytest.mark.parametrize(
    ("module", "stop"),
    [(["-m", "jfsync", "emulator"], signal.SIGTERM), (["-m", "jfsync.emulator"], signal.SIGINT)],
)
async def test_command_line_runs_until_signalled(
    session: aiohttp.ClientSession, module: list[str], stop: signal.Signals
) -> None:
    users = [arg for name, pw in USERS for arg in ("--user", f"{name}:{pw}")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *module,
        "--port",
        "0",
        "--api-key",
        API_KEY,
        *users,
        "--library-size",
        "50",
        "--server-version",
        "10.11.11",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert "listening on http://127.0.0.1:" in line
        assert "alice (admin)" in line
        assert "bob" in line
        assert API_KEY not in line
        assert "alice-pw" not in line
        url = line.split("listening on ")[1].split()[0]
        async with session.get(url + "/System/Info/Public") as resp:
            assert (await resp.json())["Version"] == "10.11.11"
        proc.send_signal(stop)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_wipe_user_data_loses_it_silently(http: Http) -> None:
    """A server that lost its data: same ids, every record gone, and no push for any of it."""
    emu = http.emu
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    movie, other = emu.leaf_items()[0], emu.leaf_items()[1]
    emu.save_user_data(alice, movie.id, is_favorite=True, played=True, play_count=2)
    emu.save_user_data(bob, other.id, rating=7.0)
    await emu.flush_now()
    token = emu.user_token("alice")
    ws = await http.ws(token)
    async with ws:
        await next_message(ws, "ForceKeepAlive")
        reply = await http.post("/__emulator__/wipe-user-data", params={"userId": alice})
        assert reply.body == {"dropped": 1}
        # No push for the wipe: the next message carries only a later, ordinary save.
        marker = emu.leaf_items()[2]
        emu.save_user_data(alice, marker.id, is_favorite=True)
        await emu.flush_now()
        pushed = await next_message(ws, "UserDataChanged")
        ids = {e["ItemId"] for e in pushed["Data"]["UserDataList"]}
        assert marker.id in ids
        assert movie.id not in ids
        path = f"/UserItems/{movie.id}/UserData"
        body = (await http.get(path, params={"userId": alice})).body
        assert (body["IsFavorite"], body["Played"], body["PlayCount"]) == (False, False, 0)
    # Bob's data is untouched until every user's is wiped.
    assert emu.user_data(bob, other.id).rating == 7.0
    assert emu.wipe_user_data() == 2  # bob's rating and alice's marker favourite
    assert emu.user_data(bob, other.id).is_default
