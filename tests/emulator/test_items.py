"""The emulated library and ``/Items``: generation, paging, filters, fields and sorting (§5)."""

from __future__ import annotations

import time

import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import Library
from jfsync.ids import derive_item_id
from tests.emulator.conftest import Http, MakeEmulator

pytestmark = pytest.mark.timeout(30)


def test_generation_is_deterministic_and_jellyfin_shaped() -> None:
    one, two = Library("/media"), Library("/media")
    one.generate(300, seed=7)
    two.generate(300, seed=7)
    assert [i.id for i in one.items()] == [i.id for i in two.items()]
    other_root = Library("/srv/media")
    other_root.generate(300, seed=7)
    assert not {i.id for i in one.items()} & {i.id for i in other_root.items()}
    leaves = one.leaf_items()
    assert len(leaves) == 300
    kinds = {i.type for i in one.items()}
    assert kinds == {"Movie", "Series", "Season", "Episode"}
    for item in one.items():
        assert item.id == derive_item_id(item.type, item.path)
    movie = next(i for i in leaves if i.type == "Movie")
    assert (
        movie.path == f"/media/movies/{movie.name} ({movie.year})/{movie.name} ({movie.year}).mkv"
    )
    assert set(movie.provider_ids) == {"Tmdb", "Imdb"}
    # A movie's parent is the physical folder the collection folder stands for.
    assert movie.parent_id == one.movies_root.id
    assert one.physical(one.movies_folder.id) == one.movies_root.id
    episode = next(i for i in leaves if i.type == "Episode")
    season = one.get(episode.parent_id or "")
    series = one.get(episode.series_id or "")
    assert season is not None
    assert series is not None
    assert episode.season_id == season.id
    assert season.parent_id == series.id
    assert episode.path.startswith(f"/media/tv/{series.name} ({series.year})/Season 0")
    assert episode.path.endswith(
        f"S{episode.parent_index_number:02d}E{episode.index_number:02d}.mkv"
    )
    assert "Tvdb" in episode.provider_ids
    assert episode.provider_ids != series.provider_ids
    assert episode.user_data_key.startswith(series.provider_ids["Tvdb"])
    bare = Library("/media", provider_ids=False)
    bare.generate(50, seed=7)
    assert all(not i.provider_ids for i in bare.items())


def test_a_hundred_thousand_items_generate_in_seconds() -> None:
    started = time.perf_counter()
    library = Library("/media")
    library.generate(100_000, seed=1)
    elapsed = time.perf_counter() - started
    assert len(library.leaf_items()) == 100_000
    assert len({i.path for i in library.items()}) == len(library)
    assert elapsed < 15, f"generation took {elapsed:.1f} s"


async def test_paging_covers_everything_once(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    seen: list[str] = []
    start = 0
    while True:
        reply = await http.get(
            "/Items",
            params={
                "userId": alice,
                "Recursive": "true",
                "IncludeItemTypes": "Movie,Episode",
                "StartIndex": str(start),
                "Limit": "7",
                "SortBy": "SortName",
            },
        )
        assert reply.body["TotalRecordCount"] == 60
        assert reply.body["StartIndex"] == start
        page = reply.body["Items"]
        if not page:
            break
        seen += [i["Id"] for i in page]
        start += len(page)
    assert sorted(seen) == sorted(i.id for i in emu.leaf_items())
    assert len(seen) == len(set(seen))


async def test_fields_and_user_data_only_when_asked(http: Http) -> None:
    emu = http.emu
    params = {"Recursive": "true", "IncludeItemTypes": "Movie", "Limit": "1"}
    bare = (await http.get("/Items", params=params)).body["Items"][0]
    assert "Path" not in bare
    assert "ProviderIds" not in bare
    assert "UserData" not in bare
    full = (
        await http.get(
            "/Items",
            params=[
                *params.items(),
                ("Fields", "Path"),
                ("Fields", "ProviderIds"),
                ("userId", emu.user_id("bob")),
            ],
        )
    ).body["Items"][0]
    item = emu.item(full["Id"])
    assert full["Path"] == item.path
    assert full["ProviderIds"] == item.provider_ids
    assert full["UserData"]["Played"] is False
    no_user_data = (
        await http.get(
            "/Items", params={**params, "userId": emu.user_id("bob"), "EnableUserData": "false"}
        )
    ).body["Items"][0]
    assert "UserData" not in no_user_data
    # A user token means its own user: UserData without a userId parameter.
    mine = (await http.get("/Items", params=params, token=emu.user_token("bob"))).body["Items"][0]
    assert "UserData" in mine


async def test_user_data_filters(http: Http) -> None:
    emu = http.emu
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    leaves = emu.leaf_items()
    emu.save_user_data(alice, leaves[0].id, played=True)
    emu.save_user_data(alice, leaves[1].id, is_favorite=True)
    emu.save_user_data(alice, leaves[2].id, position_ticks=5000)
    emu.save_user_data(alice, leaves[3].id, rating=9)
    emu.save_user_data(alice, leaves[4].id, rating=2)
    emu.save_user_data(bob, leaves[5].id, is_favorite=True)

    async def ids(user: str, **extra: str) -> set[str]:
        params = {"userId": user, "Recursive": "true", "IncludeItemTypes": "Movie,Episode", **extra}
        reply = await http.get("/Items", params=params)
        return {i["Id"] for i in reply.body["Items"]}

    assert await ids(alice, Filters="IsPlayed") == {leaves[0].id}
    assert await ids(alice, isPlayed="true") == {leaves[0].id}
    assert leaves[0].id not in await ids(alice, Filters="IsUnplayed")
    assert await ids(alice, Filters="IsFavorite") == {leaves[1].id}
    assert await ids(alice, Filters="IsResumable") == {leaves[2].id}
    assert await ids(alice, Filters="Likes") == {leaves[3].id}
    assert await ids(alice, Filters="Dislikes") == {leaves[4].id}
    # IsFavoriteOrLikes filters on IsFavorite only (Corrections 4).
    assert await ids(alice, Filters="IsFavoriteOrLikes") == {leaves[1].id}
    assert await ids(bob, Filters="IsFavorite") == {leaves[5].id}
    assert await ids(alice, Filters="IsPlayed,IsFavorite") == set()
    both = [
        ("userId", alice),
        ("Recursive", "true"),
        ("Filters", "IsFavorite"),
        ("Filters", "Likes"),
    ]
    reply = await http.get("/Items", params=both)
    assert reply.body["TotalRecordCount"] == 0
    # A filter result follows later writes (the cache is keyed on the user's data).
    emu.save_user_data(alice, leaves[6].id, played=True)
    assert await ids(alice, Filters="IsPlayed") == {leaves[0].id, leaves[6].id}


async def test_tree_queries(http: Http) -> None:
    emu = http.emu
    roots = (await http.get("/Items", params={"userId": emu.user_id("alice")})).body["Items"]
    assert [(r["Name"], r["Type"], r["CollectionType"]) for r in roots] == [
        ("Movies", "CollectionFolder", "movies"),
        ("Shows", "CollectionFolder", "tvshows"),
    ]
    series = next(i for i in emu.items if i.type == "Series")
    children = (await http.get("/Items", params={"ParentId": series.id})).body["Items"]
    assert {c["Type"] for c in children} == {"Season"}
    below = (
        await http.get(
            "/Items", params={"ParentId": series.id, "Recursive": "true", "Filters": "IsNotFolder"}
        )
    ).body["Items"]
    assert {c["SeriesId"] for c in below} == {series.id}
    assert all(c["Type"] == "Episode" for c in below)
    folders = (await http.get("/Items", params={"Recursive": "true", "Filters": "IsFolder"})).body
    assert {i["Type"] for i in folders["Items"]} == {"Series", "Season"}


async def test_ids_sorting_and_counts(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    picked = [i.id for i in emu.leaf_items()[:4]]
    reply = await http.get("/Items", params={"Ids": ",".join(reversed(picked))})
    assert [i["Id"] for i in reply.body["Items"]] == list(reversed(picked))
    emu.save_user_data(alice, picked[2], played=True, last_played=emu.now())
    recent = await http.get(
        "/Items",
        params={
            "userId": alice,
            "Recursive": "true",
            "Filters": "IsPlayed",
            "SortBy": "DatePlayed",
            "SortOrder": "Descending",
        },
    )
    assert [i["Id"] for i in recent.body["Items"]] == [picked[2]]
    names = await http.get(
        "/Items",
        params={
            "Recursive": "true",
            "IncludeItemTypes": "Movie",
            "SortBy": "SortName",
            "SortOrder": "Descending",
        },
    )
    sort_names = [emu.item(i["Id"]).sort_name for i in names.body["Items"]]
    assert sort_names == sorted(sort_names, reverse=True)
    no_count = await http.get(
        "/Items", params={"Recursive": "true", "Limit": "3", "EnableTotalRecordCount": "false"}
    )
    assert no_count.body["TotalRecordCount"] == 3
    legacy = await http.get(f"/Users/{alice}/Items", params={"Recursive": "true", "Limit": "2"})
    assert legacy.status == 200
    assert "UserData" in legacy.body["Items"][0]
    assert emu.requests[-1].route is None
    assert emu.requests[-1].is_legacy


async def test_single_item_reads_carry_every_field(http: Http) -> None:
    emu = http.emu
    episode = next(i for i in emu.leaf_items() if i.type == "Episode")
    reply = await http.get(f"/Items/{episode.id}", params={"userId": emu.user_id("alice")})
    body = reply.body
    assert (body["Path"], body["ProviderIds"]) == (episode.path, episode.provider_ids)
    assert (body["SeriesId"], body["SeasonId"], body["ParentId"]) == (
        episode.series_id,
        episode.season_id,
        episode.season_id,
    )
    assert (body["IndexNumber"], body["ParentIndexNumber"]) == (
        episode.index_number,
        episode.parent_index_number,
    )
    assert body["UserData"]["Key"] == episode.user_data_key


async def test_library_changes_move_ids_and_data(make_emulator: MakeEmulator) -> None:
    emu: Emulator = await make_emulator()
    alice = emu.user_id("alice")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    emu.save_user_data(alice, movie.id, is_favorite=True)
    moved = emu.move_item(movie.id, "/media/elsewhere/file.mkv")
    assert moved.id == derive_item_id("Movie", "/media/elsewhere/file.mkv")
    with pytest.raises(KeyError):
        emu.item(movie.id)
    # The user-data key comes from provider ids, so the data follows the file.
    assert emu.user_data(alice, moved.id).favorite is True
    season = next(i for i in emu.items if i.type == "Season")
    added = emu.add_item("Episode", "Bonus", parent_id=season.id, provider_ids={"Tvdb": "1"})
    assert added.series_id == season.series_id
    assert emu.library.leaf_count(season.id) == len(emu.library.children(season.id))
    series_leaves = emu.library.leaf_count(season.series_id or "")
    removed = emu.remove_item(season.id)
    assert added.id in {r.id for r in removed}
    gone = sum(1 for r in removed if r.is_leaf)
    assert emu.library.leaf_count(season.series_id or "") == series_leaves - gone
