"""Folder user data (fact sheet Corrections 7): series, seasons and folders take their played
state from their leaves, per user, on every listing route, and follow the leaves as they change.
"""

from __future__ import annotations

from typing import Any

import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from tests.emulator.conftest import Http

pytestmark = pytest.mark.timeout(20)


def a_season(emu: Emulator) -> tuple[LibraryItem, LibraryItem, list[str]]:
    """A season with at least three episodes: (series, season, its episode ids)."""
    for item in emu.items:
        if item.type == "Season" and len(emu.library.children(item.id)) >= 3:
            return emu.item(item.series_id or ""), item, emu.library.children(item.id)
    raise AssertionError("no season with three episodes")


async def listed(http: Http, item_id: str, **params: str) -> dict[str, Any]:
    """The item as ``GET /Items?Ids=`` lists it."""
    reply = await http.get("/Items", params={"Ids": item_id, **params})
    assert reply.status == 200, reply.body
    (found,) = reply.body["Items"]
    assert isinstance(found, dict)
    return found


async def test_a_season_counts_its_played_episodes_per_user(http: Http) -> None:
    emu = http.emu
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    series, season, episodes = a_season(emu)
    total = len(episodes)
    series_total = emu.library.leaf_count(series.id)
    await http.post(f"/UserPlayedItems/{episodes[0]}", params={"userId": alice})

    asked = {"userId": alice, "Fields": "RecursiveItemCount"}
    entry = await listed(http, season.id, **asked)
    assert entry["RecursiveItemCount"] == total
    data = entry["UserData"]
    assert data["UnplayedItemCount"] == total - 1
    assert data["PlayedPercentage"] == pytest.approx(100 - (total - 1) / total * 100)
    assert data["Played"] is False
    entry = await listed(http, series.id, **asked)
    assert entry["RecursiveItemCount"] == series_total
    assert entry["UserData"]["UnplayedItemCount"] == series_total - 1
    assert entry["UserData"]["PlayedPercentage"] == pytest.approx(100 / series_total)

    # Bob played nothing: his season is all unplayed.
    entry = await listed(http, season.id, userId=bob, Fields="RecursiveItemCount")
    assert entry["UserData"]["UnplayedItemCount"] == total
    assert entry["UserData"]["PlayedPercentage"] == 0
    assert entry["UserData"]["Played"] is False

    # Alice watches the rest of the season: it is played, at 100 %.
    for episode in episodes[1:]:
        await http.post(f"/UserPlayedItems/{episode}", params={"userId": alice})
    data = (await listed(http, season.id, **asked))["UserData"]
    assert (data["UnplayedItemCount"], data["PlayedPercentage"], data["Played"]) == (0, 100, True)


async def test_without_recursive_item_count_there_is_no_percentage(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    _, season, episodes = a_season(emu)
    for episode in episodes:
        emu.save_user_data(alice, episode, played=True)
    entry = await listed(http, season.id, userId=alice)
    assert "RecursiveItemCount" not in entry
    assert "PlayedPercentage" not in entry["UserData"]
    assert entry["UserData"]["UnplayedItemCount"] == 0
    assert entry["UserData"]["Played"] is True
    # Without a user there is no user data and no count, even when asked.
    entry = await listed(http, season.id, Fields="RecursiveItemCount")
    assert "UserData" not in entry
    assert "RecursiveItemCount" not in entry
    # EnableUserData=false: the same.
    entry = await listed(
        http, season.id, userId=alice, Fields="RecursiveItemCount", EnableUserData="false"
    )
    assert "UserData" not in entry
    assert "RecursiveItemCount" not in entry


async def test_folder_state_follows_leaves_as_they_come_and_go(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    _, season, episodes = a_season(emu)
    for episode in episodes:
        emu.save_user_data(alice, episode, played=True)
    asked = {"userId": alice, "Fields": "RecursiveItemCount"}
    assert (await listed(http, season.id, **asked))["UserData"]["Played"] is True

    # A new episode arrives: the season is no longer played.
    fresh = emu.add_item("Episode", "Bonus", parent_id=season.id)
    entry = await listed(http, season.id, **asked)
    assert entry["RecursiveItemCount"] == len(episodes) + 1
    assert entry["UserData"]["UnplayedItemCount"] == 1
    assert entry["UserData"]["Played"] is False

    # It goes away again: played once more.
    emu.remove_item(fresh.id)
    entry = await listed(http, season.id, **asked)
    assert entry["RecursiveItemCount"] == len(episodes)
    assert entry["UserData"]["Played"] is True

    # A played episode is removed and the rest are unplayed by the user: 0 %.
    emu.remove_item(episodes[0])
    for episode in episodes[1:]:
        await http.delete(f"/UserPlayedItems/{episode}", params={"userId": alice})
    data = (await listed(http, season.id, **asked))["UserData"]
    assert (data["UnplayedItemCount"], data["PlayedPercentage"], data["Played"]) == (
        len(episodes) - 1,
        0,
        False,
    )


async def test_every_listing_route_carries_folder_user_data(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    series, season, episodes = a_season(emu)
    emu.save_user_data(alice, episodes[0], played=True)
    unplayed = emu.library.leaf_count(season.id) - 1

    def season_of(items: list[dict[str, Any]]) -> dict[str, Any]:
        return next(i for i in items if i["Id"] == season.id)

    fields = {"Fields": "RecursiveItemCount"}
    replies = [
        await http.get("/Items", params={"userId": alice, "ParentId": series.id, **fields}),
        await http.get(f"/Users/{alice}/Items", params={"ParentId": series.id, **fields}),
        await http.get(
            "/Items",
            params={"userId": alice, "Recursive": "true", "IncludeItemTypes": "Season", **fields},
        ),
    ]
    for reply in replies:
        assert reply.status == 200
        entry = season_of(reply.body["Items"])
        assert entry["UserData"]["UnplayedItemCount"] == unplayed
        assert entry["RecursiveItemCount"] == unplayed + 1
    # A single-item read asks for every field, so it has the count and the percentage too.
    for path in (f"/Items/{season.id}", f"/Users/{alice}/Items/{season.id}"):
        reply = await http.get(path, params={"userId": alice})
        assert reply.body["RecursiveItemCount"] == unplayed + 1
        assert reply.body["UserData"]["PlayedPercentage"] == pytest.approx(100 / (unplayed + 1))
    # The user-data route builds no item DTO: count and played state, no percentage.
    reply = await http.get(f"/UserItems/{season.id}/UserData", params={"userId": alice})
    assert reply.body["UnplayedItemCount"] == unplayed
    assert "PlayedPercentage" not in reply.body


async def test_collection_folders_do_not_count_their_leaves(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    reply = await http.get("/UserViews", params={"userId": alice, "Fields": "RecursiveItemCount"})
    for view in reply.body["Items"]:
        assert "UnplayedItemCount" not in view["UserData"]
        assert "RecursiveItemCount" not in view
        assert view["UserData"]["Played"] is False


async def test_a_movies_parent_is_its_physical_folder(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    root = emu.library.movies_root
    entry = await listed(http, movie.id, userId=alice, Fields="ParentId")
    assert entry["ParentId"] == root.id
    physical = await http.get(f"/Items/{root.id}", params={"userId": alice})
    assert (physical.body["Type"], physical.body["Path"]) == (
        "Folder",
        f"{emu.library.path_root}/movies",
    )
    # A plain folder takes its played state from its leaves, like a season.
    movies = [i for i in emu.leaf_items() if i.type == "Movie"]
    emu.save_user_data(alice, movie.id, played=True)
    assert physical.body["UserData"]["UnplayedItemCount"] == len(movies)
    data = (await http.get(f"/UserItems/{root.id}/UserData", params={"userId": alice})).body
    assert data["UnplayedItemCount"] == len(movies) - 1
    # The collection folder still lists the movies as its children.
    reply = await http.get(
        "/Items", params={"userId": alice, "ParentId": emu.library.movies_folder.id}
    )
    assert sorted(i["Id"] for i in reply.body["Items"]) == sorted(m.id for m in movies)
