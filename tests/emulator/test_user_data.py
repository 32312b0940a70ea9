"""User-data routes of the emulator: §4.1 routes, §4.2 partial updates, MarkPlayed, playback."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from jfsync.timing import ManualClock
from tests.emulator.conftest import Http, MakeEmulator

pytestmark = pytest.mark.timeout(20)


def a_movie(emu: Emulator) -> LibraryItem:
    """The first movie."""
    return next(i for i in emu.leaf_items() if i.type == "Movie")


async def test_partial_update_copies_only_present_fields(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    path = f"/UserItems/{movie.id}/UserData"
    first = await http.post(
        path,
        params={"userId": alice},
        json_body={
            "Played": True,
            "PlayCount": 3,
            "LastPlayedDate": "2025-03-01T20:15:42.1234567Z",
            "PlaybackPositionTicks": 12345,
            "IsFavorite": True,
            "Rating": 7.5,
        },
    )
    assert first.status == 200
    assert first.body["LastPlayedDate"] == "2025-03-01T20:15:42.1234560Z"
    assert first.body["Likes"] is True
    # Position is stored raw, no resume normalisation, Played untouched.
    assert first.body["PlaybackPositionTicks"] == 12345
    assert first.body["Played"] is True
    # nulls and missing fields leave values alone; unknown and ignored fields are ignored.
    second = await http.post(
        path,
        params={"userId": alice},
        json_body={
            "rating": None,
            "lastPlayedDate": None,
            "isfavorite": False,
            "Key": "ignored",
            "UnplayedItemCount": 4,
            "Whatever": 1,
        },
    )
    assert second.status == 200
    body = second.body
    assert body["Rating"] == 7.5
    assert body["LastPlayedDate"] == "2025-03-01T20:15:42.1234560Z"
    assert body["IsFavorite"] is False
    assert body["PlayCount"] == 3
    assert body["Key"] == movie.user_data_key
    stored = emu.user_data(alice, movie.id)
    assert stored.play_state.last_played_s == int(
        datetime(2025, 3, 1, 20, 15, 42, tzinfo=UTC).timestamp()
    )


async def test_rating_beats_likes_and_likes_derive_from_rating(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    path = f"/UserItems/{a_movie(emu).id}/UserData"
    both = await http.post(path, params={"userId": alice}, json_body={"Likes": True, "Rating": 3})
    assert (both.body["Rating"], both.body["Likes"]) == (3, False)
    likes = await http.post(path, params={"userId": alice}, json_body={"Likes": True})
    assert (likes.body["Rating"], likes.body["Likes"]) == (10, True)


async def test_rating_routes(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    liked = await http.post(
        f"/UserItems/{movie.id}/Rating", params={"userId": alice, "likes": "true"}
    )
    assert (liked.body["Rating"], liked.body["Likes"]) == (10, True)
    disliked = await http.post(f"/Users/{alice}/Items/{movie.id}/Rating", params={"likes": "false"})
    assert (disliked.body["Rating"], disliked.body["Likes"]) == (1, False)
    cleared = await http.delete(f"/UserItems/{movie.id}/Rating", params={"userId": alice})
    assert cleared.status == 200
    assert "Rating" not in cleared.body
    assert "Likes" not in cleared.body
    assert emu.user_data(alice, movie.id).rating is None


async def test_favourite_routes_new_and_legacy(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    on = await http.post(f"/UserFavoriteItems/{movie.id}", params={"userId": alice})
    assert on.body["IsFavorite"] is True
    off = await http.delete(f"/Users/{alice}/FavoriteItems/{movie.id}")
    assert off.body["IsFavorite"] is False
    assert emu.requests[-1].route is None
    assert emu.requests[-1].is_legacy is True
    assert emu.requests[-2].route == "/UserFavoriteItems/{itemId}"


async def test_mark_played_semantics(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    played = await http.post(f"/UserPlayedItems/{movie.id}", params={"userId": alice})
    # No datePlayed: PlayCount = max(count, 1), LastPlayedDate = now.
    assert played.body["PlayCount"] == 1
    assert played.body["LastPlayedDate"] == emu.now().strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"
    again = await http.post(
        f"/UserPlayedItems/{movie.id}", params={"userId": alice, "datePlayed": "20240102030405"}
    )
    assert again.body["PlayCount"] == 2
    assert again.body["LastPlayedDate"] == "2024-01-02T03:04:05.0000000Z"
    iso = await http.post(
        f"/Users/{alice}/PlayedItems/{movie.id}", params={"datePlayed": "2024-05-06T07:08:09Z"}
    )
    assert iso.body["PlayCount"] == 3
    assert iso.body["LastPlayedDate"] == "2024-05-06T07:08:09.0000000Z"
    bad = await http.post(
        f"/UserPlayedItems/{movie.id}", params={"userId": alice, "datePlayed": "x"}
    )
    assert bad.status == 400


async def test_delete_played_clears_count_position_and_date(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    emu.save_user_data(
        alice,
        movie.id,
        played=True,
        play_count=4,
        position_ticks=999,
        last_played=datetime(2025, 1, 1, tzinfo=UTC),
        is_favorite=True,
        rating=8,
    )
    reply = await http.delete(f"/UserPlayedItems/{movie.id}", params={"userId": alice})
    body = reply.body
    assert (body["Played"], body["PlayCount"], body["PlaybackPositionTicks"]) == (False, 0, 0)
    assert "LastPlayedDate" not in body
    # Favourite and rating are another register: untouched.
    assert (body["IsFavorite"], body["Rating"]) == (True, 8)


async def test_marking_a_folder_recurses_into_its_leaves(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    series = next(i for i in emu.items if i.type == "Series")
    leaves = [i for i in emu.library.descendants(series.id) if emu.item(i).is_leaf]
    reply = await http.post(f"/UserPlayedItems/{series.id}", params={"userId": alice})
    assert reply.body["Played"] is True
    assert reply.body["UnplayedItemCount"] == 0
    assert all(emu.user_data(alice, leaf).play_state.played for leaf in leaves)
    # The folder's own row is not written by Folder.MarkPlayed.
    assert emu.user_data(alice, series.id).play_state.play_count == 0
    reply = await http.delete(f"/UserPlayedItems/{series.id}", params={"userId": alice})
    assert reply.body["UnplayedItemCount"] == len(leaves)
    assert not any(emu.user_data(alice, leaf).play_state.played for leaf in leaves)


async def test_rest_item_id_per_version(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    expected = {"10.9.11": None, "10.10.7": "0" * 32, "10.11.11": "self", "12.0.0": "self"}
    for version, want in expected.items():
        emu = await make_emulator(server_version=version)
        http = Http(session, emu)
        movie = a_movie(emu)
        reply = await http.get(
            f"/UserItems/{movie.id}/UserData", params={"userId": emu.user_id("bob")}
        )
        got = reply.body.get("ItemId")
        assert got == (movie.id if want == "self" else want), version


async def test_10_8_has_only_legacy_routes(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await make_emulator(server_version="10.8.13")
    http = Http(session, emu)
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    assert (
        await http.post(f"/UserItems/{movie.id}/UserData", params={"userId": alice}, json_body={})
    ).status == 404
    assert (
        await http.post(f"/UserFavoriteItems/{movie.id}", params={"userId": alice})
    ).status == 404
    assert (await http.get(f"/Users/{alice}/Items/{movie.id}/UserData")).status == 404
    fav = await http.post(f"/Users/{alice}/FavoriteItems/{movie.id}")
    assert fav.status == 200
    assert "ItemId" not in fav.body
    # In 10.8 the legacy routes are the documented ones.
    assert emu.requests[-1].route == "/Users/{userId}/FavoriteItems/{itemId}"
    item = await http.get(f"/Users/{alice}/Items/{movie.id}")
    assert item.body["UserData"]["IsFavorite"] is True


async def test_writes_are_recorded(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = a_movie(emu)
    await http.post(
        f"/UserItems/{movie.id}/UserData", params={"userId": alice}, json_body={"Played": True}
    )
    await http.delete(f"/Users/{alice}/Items/{movie.id}/Rating")
    await http.get(f"/UserItems/{movie.id}/UserData", params={"userId": alice})
    assert [(w.method, w.route, w.user_id, w.item_id, w.body, w.client) for w in emu.writes] == [
        ("POST", "/UserItems/{itemId}/UserData", alice, movie.id, {"Played": True}, "emu-test"),
        ("DELETE", "/Users/{userId}/Items/{itemId}/Rating", alice, movie.id, None, "emu-test"),
    ]


async def test_playback_reporting(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    emu = await make_emulator(clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    token = emu.user_token("alice")
    movie = a_movie(emu)
    runtime = movie.run_time_ticks or 0
    emu.save_user_data(alice, movie.id, played=True, play_count=1)

    async def report(path: str, body: dict[str, object]) -> None:
        reply = await http.post(path, token=token, json_body=body)
        assert reply.status == 204

    await report("/Sessions/Playing", {"ItemId": movie.id, "PositionTicks": 0})
    state = emu.user_data(alice, movie.id).play_state
    # Start: PlayCount+1, LastPlayedDate = now, resumable video becomes unplayed.
    assert (state.played, state.play_count) == (False, 2)
    assert state.last_played_s == clock.wall_ms() // 1000
    await report("/Sessions/Playing/Progress", {"ItemId": movie.id, "PositionTicks": runtime // 2})
    assert emu.user_data(alice, movie.id).play_state.position_ticks == runtime // 2
    await report("/Sessions/Playing/Stopped", {"ItemId": movie.id, "PositionTicks": runtime // 2})
    state = emu.user_data(alice, movie.id).play_state
    assert (state.played, state.position_ticks) == (False, runtime // 2)
    await report("/Sessions/Playing/Stopped", {"ItemId": movie.id, "PositionTicks": runtime // 100})
    assert emu.user_data(alice, movie.id).play_state.position_ticks == 0  # under 5 %
    await report(
        "/Sessions/Playing/Stopped", {"ItemId": movie.id, "PositionTicks": runtime * 95 // 100}
    )
    state = emu.user_data(alice, movie.id).play_state
    assert (state.played, state.position_ticks, state.play_count) == (True, 0, 2)
    # An API key has no user in its session: nothing is saved.
    await report_as_key(http, movie.id)
    assert emu.user_data(alice, movie.id).play_state.play_count == 2


async def report_as_key(http: Http, item_id: str) -> None:
    """Report a playback start with the admin key."""
    reply = await http.post("/Sessions/Playing", json_body={"ItemId": item_id})
    assert reply.status == 204


async def test_short_items_play_to_completion() -> None:
    from jfsync.emulator.app import _resume_position

    ten_minutes = 10 * 60 * 10_000_000
    assert _resume_position(ten_minutes // 2, ten_minutes) == (ten_minutes // 2, False)
    four_minutes = 4 * 60 * 10_000_000
    # Under MinResumeDurationSeconds (300 s) a stop in the middle counts as played.
    assert _resume_position(four_minutes // 2, four_minutes) == (0, True)
    assert _resume_position(5, 0) == (0, True)
