"""Shared user data (fact sheet Corrections 10): up to 10.10 items with the same provider ids
share one user-data record and a write to one changes the other without a push for it; from
10.11 each item has its own, and data of a removed item returns with an item of the same key."""

from __future__ import annotations

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from jfsync.timing import ManualClock
from tests.emulator.conftest import Http, MakeEmulator, next_message
from tests.emulator.test_sockets import open_user_socket

pytestmark = pytest.mark.timeout(20)


def second_version(emu: Emulator) -> tuple[LibraryItem, LibraryItem]:
    """A movie and a second version of it (same provider ids, another file)."""
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    folder = movie.path.rsplit("/", 1)[0]
    other = emu.add_item(
        "Movie",
        movie.name,
        year=movie.year,
        provider_ids=dict(movie.provider_ids),
        path=f"{folder}/{movie.name} - 4K.mkv",
    )
    assert other.user_data_key == movie.user_data_key
    assert other.id != movie.id
    return movie, other


async def test_up_to_10_10_two_versions_share_one_record_silently(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock, server_version="10.10.7")
    http = Http(session, emu)
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    emu.save_user_data(alice, movie.id, rating=8)
    await clock.advance(1)
    movie, other = second_version(emu)
    # The new version finds the record it shares.
    assert emu.user_data(alice, other.id).rating == 8
    ws = await open_user_socket(http, "alice")
    async with ws:
        reply = await http.post(f"/UserFavoriteItems/{movie.id}", params={"userId": alice})
        assert reply.status == 200
        await clock.advance(0.5)
        message = await next_message(ws, "UserDataChanged")
        pushed = {e["ItemId"] for e in message["Data"]["UserDataList"]}
        # Only the item written (and its folder) is pushed; the other version changed silently.
        assert movie.id in pushed
        assert other.id not in pushed
        reading = await http.get(f"/UserItems/{other.id}/UserData", params={"userId": alice})
        assert reading.body["IsFavorite"] is True
        # And the other way round.
        await http.post(f"/UserPlayedItems/{other.id}", params={"userId": alice})
        await clock.advance(0.5)
        message = await next_message(ws, "UserDataChanged")
        pushed = {e["ItemId"] for e in message["Data"]["UserDataList"]}
        assert other.id in pushed
        assert movie.id not in pushed
    assert emu.user_data(alice, movie.id).play_state.played is True
    # Per user: bob's data is his own.
    assert emu.user_data(bob, other.id).favorite is False
    # Removing one version leaves the record with the other.
    emu.remove_item(movie.id)
    assert emu.user_data(alice, other.id).favorite is True


async def test_from_10_11_versions_are_separate_and_data_returns_with_its_key(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await make_emulator(server_version="10.11.11")
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie, other = second_version(emu)
    await http.post(f"/UserFavoriteItems/{movie.id}", params={"userId": alice})
    assert emu.user_data(alice, other.id).favorite is False
    # The film is removed (both versions) and comes back: the data is re-attached.
    emu.remove_item(other.id)
    emu.remove_item(movie.id)
    back = emu.add_item("Movie", movie.name, year=movie.year, provider_ids=dict(movie.provider_ids))
    assert back.id == movie.id
    reply = await http.get(f"/UserItems/{back.id}/UserData", params={"userId": alice})
    assert reply.body["IsFavorite"] is True


async def test_folder_counts_follow_a_silent_change(http: Http) -> None:
    emu = http.emu  # 10.10.7
    alice = emu.user_id("alice")
    movie, _ = second_version(emu)
    root = emu.library.movies_root
    before = (await http.get(f"/UserItems/{root.id}/UserData", params={"userId": alice})).body
    await http.post(f"/UserPlayedItems/{movie.id}", params={"userId": alice})
    after = (await http.get(f"/UserItems/{root.id}/UserData", params={"userId": alice})).body
    # Both versions became played: two fewer unplayed leaves.
    assert after["UnplayedItemCount"] == before["UnplayedItemCount"] - 2
