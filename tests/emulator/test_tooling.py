"""The emulator as a tool for others: request records over the control API and ``--state FILE``
(a server restarted with its library and user data, or without them)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.emulator.conftest import API_KEY, USERS, Http, MakeEmulator, auth_header

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


async def test_request_records_are_readable_over_the_control_api(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = emu.leaf_items()[0]
    await http.get("/System/Info")
    await http.post(f"/UserFavoriteItems/{movie.id}", params={"userId": alice, "api_key": API_KEY})
    async with http.session.get(emu.url + "/__emulator__/requests") as resp:
        body = await resp.json()
    assert body["total"] == len(body["requests"]) >= 2
    paths = [r["path"] for r in body["requests"]]
    assert "/System/Info" in paths
    favourite = next(r for r in body["requests"] if r["path"].startswith("/UserFavoriteItems"))
    assert favourite["route"] == "/UserFavoriteItems/{itemId}"
    assert favourite["status"] == 200
    assert favourite["query"]["api_key"] == ["<redacted>"]
    assert API_KEY not in str(body)
    since = body["total"]
    await http.get("/System/Info")
    async with http.session.get(emu.url + f"/__emulator__/requests?since={since}") as resp:
        later = await resp.json()
    # The control read itself is recorded too (after its answer), then the new request.
    assert [r["index"] for r in later["requests"]] == [since, since + 1]
    assert [r["path"] for r in later["requests"]] == ["/__emulator__/requests", "/System/Info"]
    assert later["requests"][0]["is_control"] is True
    async with http.session.get(emu.url + "/__emulator__/writes") as resp:
        writes = await resp.json()
    assert [(w["route"], w["user_id"], w["item_id"]) for w in writes["writes"]] == [
        ("/UserFavoriteItems/{itemId}", alice, movie.id)
    ]


async def test_a_saved_server_comes_back_with_its_library_and_user_data(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    state = str(tmp_path / "alpha.json")
    first = await make_emulator(state_file=state, server_name="alpha", server_version="10.11.11")
    alice = first.user_id("alice")
    added = first.add_item("Movie", "Only Here", year=2026, provider_ids={"Tmdb": "777"})
    episode = next(i for i in first.leaf_items() if i.type == "Episode")
    first.save_user_data(alice, added.id, is_favorite=True, rating=7.5)
    first.save_user_data(alice, episode.id, played=True, play_count=2, last_played=first.now())
    gone = next(i for i in first.leaf_items() if i.type == "Movie" and i.id != added.id)
    first.save_user_data(alice, gone.id, played=True)
    first.remove_item(gone.id)
    await first.flush_now()
    saved = first.save_state()
    assert saved == state
    await first.close()

    again = await make_emulator(state_file=state, server_name="other-name", library_size=3)
    assert again.server_id == first.server_id
    assert again.user_id("alice") == alice
    assert [i.id for i in again.items] == [i.id for i in first.items]
    assert again.user_data(alice, added.id) == first.user_data(alice, added.id)
    assert again.stored_user_data(alice, episode.id) == first.stored_user_data(alice, episode.id)
    # Folder counters are rebuilt from the leaves.
    season = again.item(episode.season_id or "")
    dto = again.user_data_dto(alice, season, item_id=season.id)
    assert dto["UnplayedItemCount"] == again.library.leaf_count(season.id) - 1
    # User data of the removed item was kept, and returns with an item of the same key.
    back = again.add_item("Movie", gone.name, year=gone.year, provider_ids=gone.provider_ids)
    assert again.user_data(alice, back.id).play_state.played is True

    # Without the state file the same server starts fresh: generated library, no user data.
    fresh = await make_emulator(server_name="alpha", server_version="10.11.11")
    assert fresh.server_id == first.server_id
    assert fresh.library.get(added.id) is None
    assert fresh.user_data(alice, episode.id).play_state.played is False


async def test_a_bad_state_file_is_refused_by_name(tmp_path: Path) -> None:
    from jfsync.emulator import Emulator
    from jfsync.emulator.persist import StateFileError

    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 99}')
    with pytest.raises(StateFileError) as caught:
        Emulator(state_file=str(bad))
    assert str(bad) in str(caught.value)


async def _run_emulator(state: Path, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    users = [arg for name, pw in USERS for arg in ("--user", f"{name}:{pw}")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jfsync",
        "emulator",
        "--port",
        "0",
        "--api-key",
        API_KEY,
        *users,
        "--library-size",
        "30",
        "--state",
        str(state),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert "listening on http://127.0.0.1:" in line, line
    return proc, line.split("listening on ")[1].split()[0]


async def _stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_state_on_the_command_line_survives_a_restart(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    state = tmp_path / "server.json"
    headers = auth_header(API_KEY)
    proc, url = await _run_emulator(state)
    try:
        async with session.get(url + "/__emulator__/state") as resp:
            alice = (await resp.json())["users"]["alice"]
        async with session.get(
            url + "/Items",
            params={
                "userId": alice,
                "Recursive": "true",
                "Limit": "1",
                "IncludeItemTypes": "Movie",
            },
            headers=headers,
        ) as resp:
            movie = (await resp.json())["Items"][0]["Id"]
        async with session.post(
            url + f"/UserFavoriteItems/{movie}", params={"userId": alice}, headers=headers
        ) as resp:
            assert resp.status == 200
        await _stop(proc)
        assert state.exists()

        proc, url = await _run_emulator(state)
        async with session.get(
            url + f"/UserItems/{movie}/UserData", params={"userId": alice}, headers=headers
        ) as resp:
            assert (await resp.json())["IsFavorite"] is True
        await _stop(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    broken = tmp_path / "broken.json"
    broken.write_text("not json")
    failed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jfsync",
        "emulator",
        "--port",
        "0",
        "--state",
        str(broken),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    _, err = await asyncio.wait_for(failed.communicate(), 20)
    assert failed.returncode == 2
    assert str(broken) in err.decode()
