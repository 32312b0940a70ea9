"""Playback reporting as the server does it (fact sheet Corrections 2 and 3): progress applies
the resume rules and is never pushed, a v12 rewatch keeps Played, a failed stop saves nothing and
a negative stop position is refused."""

from __future__ import annotations

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from jfsync.timing import ManualClock
from tests.emulator.conftest import Http, MakeEmulator, next_message
from tests.emulator.test_sockets import assert_quiet, open_user_socket, pushes, settle

pytestmark = pytest.mark.timeout(20)


def a_movie(emu: Emulator) -> LibraryItem:
    """A movie long enough for resume points (over five minutes)."""
    return next(i for i in emu.leaf_items() if i.type == "Movie")


async def report(http: Http, token: str, path: str, body: dict[str, object]) -> int:
    """Send one playback report as the user; return the status."""
    reply = await http.post(path, token=token, json_body=body)
    return reply.status


async def test_progress_applies_the_resume_rules_without_any_push(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    runtime = movie.run_time_ticks or 0
    token = emu.user_token("alice")
    ws = await open_user_socket(http, "alice")
    async with ws:
        progress = "/Sessions/Playing/Progress"
        # Under 5 %: stored as 0.
        assert await report(http, token, progress, {"ItemId": movie.id, "PositionTicks": 10}) == 204
        assert emu.user_data(alice, movie.id).play_state.position_ticks == 0
        # In the middle: stored as given (a number in a string binds too).
        half = str(runtime // 2)
        assert await report(http, token, progress, {"ItemId": movie.id, "PositionTicks": half})
        assert emu.user_data(alice, movie.id).play_state.position_ticks == runtime // 2
        # Past 90 %: Played, position 0, PlayCount + 1, LastPlayedDate now.
        await clock.advance(30)
        near_end = runtime * 95 // 100
        await report(http, token, progress, {"ItemId": movie.id, "PositionTicks": near_end})
        state = emu.user_data(alice, movie.id).play_state
        assert (state.played, state.position_ticks, state.play_count) == (True, 0, 1)
        assert state.last_played_s == clock.wall_ms() // 1000
        # Further reports past the end count the play once.
        await report(http, token, progress, {"ItemId": movie.id, "PositionTicks": near_end + 1})
        assert emu.user_data(alice, movie.id).play_state.play_count == 1
        # None of it reached alice's socket: the server became Played with no event.
        await clock.advance(5)
        await settle(emu)
        await assert_quiet(ws)
        assert pushes(emu) == []
        listed = await http.get(f"/Items/{movie.id}", params={"userId": alice})
        assert listed.body["UserData"]["Played"] is True


@pytest.mark.parametrize(("version", "unplays"), [("10.11.11", True), ("12.0.0", False)])
async def test_a_rewatch_start_unplays_only_before_12(
    make_emulator: MakeEmulator,
    session: aiohttp.ClientSession,
    clock: ManualClock,
    version: str,
    unplays: bool,
) -> None:
    emu = await make_emulator(clock=clock, server_version=version)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    emu.save_user_data(alice, movie.id, played=True, play_count=1)
    await clock.advance(1)
    await settle(emu)
    token = emu.user_token("alice")
    ws = await open_user_socket(http, "alice")
    async with ws:
        await clock.advance(30)
        assert await report(http, token, "/Sessions/Playing", {"ItemId": movie.id}) == 204
        await clock.advance(0.5)
        message = await next_message(ws, "UserDataChanged")
        entry = next(e for e in message["Data"]["UserDataList"] if e["ItemId"] == movie.id)
        assert entry["Played"] is (not unplays)
        assert entry["PlayCount"] == 2
        state = emu.user_data(alice, movie.id).play_state
        assert state.last_played_s == clock.wall_ms() // 1000
        assert state.played is (not unplays)


async def test_a_failed_stop_saves_nothing(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    runtime = movie.run_time_ticks or 0
    emu.save_user_data(alice, movie.id, position_ticks=runtime // 3)
    await clock.advance(1)
    await settle(emu)
    token = emu.user_token("alice")
    ws = await open_user_socket(http, "alice")
    async with ws:
        stopped = "/Sessions/Playing/Stopped"
        body = {"ItemId": movie.id, "PositionTicks": runtime * 95 // 100, "Failed": True}
        assert await report(http, token, stopped, body) == 204
        # No position: a failed stop would otherwise count as fully played.
        assert await report(http, token, stopped, {"ItemId": movie.id, "Failed": True}) == 204
        await clock.advance(1)
        await settle(emu)
        await assert_quiet(ws)
    state = emu.user_data(alice, movie.id).play_state
    assert (state.played, state.position_ticks, state.play_count) == (False, runtime // 3, 0)


async def test_a_negative_stop_position_is_400(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    token = emu.user_token("alice")
    body = {"ItemId": movie.id, "PositionTicks": -5}
    assert await report(http, token, "/Sessions/Playing/Stopped", body) == 400
    assert emu.user_data(alice, movie.id).play_state.played is False
    text = {"ItemId": movie.id, "PositionTicks": "soon"}
    assert await report(http, token, "/Sessions/Playing/Stopped", text) == 400
    # A stop with a position in the middle keeps the resume point and does not count a play.
    middle = {"ItemId": movie.id, "PositionTicks": (movie.run_time_ticks or 0) // 2}
    assert await report(http, token, "/Sessions/Playing/Stopped", middle) == 204
    state = emu.user_data(alice, movie.id).play_state
    assert (state.played, state.play_count) == (False, 0)
    assert state.position_ticks == (movie.run_time_ticks or 0) // 2
