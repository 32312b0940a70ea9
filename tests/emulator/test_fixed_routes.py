"""Fixed-name routes are served as such, never read as item ids (issue item 9): /Items/Latest,
/Items/Suggestions, /Items/Root, /Items/Counts, /Items/Filters, /Users/{userId}/Items/Latest,
/Library/MediaFolders, /Library/VirtualFolders, /Items/{id}/Ancestors, /Items/{id}/Similar and
/Artists."""

from __future__ import annotations

import aiohttp
import pytest

from tests.emulator.conftest import Http, MakeEmulator

pytestmark = pytest.mark.timeout(20)


async def test_latest_lists_new_items_newest_first(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    newest = emu.add_item("Movie", "Brand New", year=2026)
    for path in ("/Items/Latest", f"/Users/{alice}/Items/Latest"):
        reply = await http.get(path, params={"userId": alice, "Limit": "5"})
        assert reply.status == 200, (path, reply.body)
        assert isinstance(reply.body, list)
        assert len(reply.body) == 5
        assert reply.body[0]["Id"] == newest.id
        assert "UserData" in reply.body[0]
    # Grouped (the default), several new episodes of a series show as the series.
    grouped = await http.get("/Items/Latest", params={"userId": alice, "Limit": "100"})
    types = {i["Type"] for i in grouped.body}
    assert "Episode" not in types
    assert "Series" in types
    flat = await http.get(
        "/Items/Latest", params={"userId": alice, "groupItems": "false", "Limit": "100"}
    )
    assert "Episode" in {i["Type"] for i in flat.body}
    emu.save_user_data(alice, newest.id, played=True)
    unplayed = await http.get("/Items/Latest", params={"userId": alice, "isPlayed": "false"})
    assert newest.id not in {i["Id"] for i in unplayed.body}
    assert (await http.get("/Items/Latest")).status == 400  # an API key needs a userId


async def test_the_other_fixed_routes(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movies = [i for i in emu.leaf_items() if i.type == "Movie"]
    episodes = [i for i in emu.leaf_items() if i.type == "Episode"]
    emu.save_user_data(alice, movies[0].id, is_favorite=True, played=True)

    suggestions = await http.get("/Items/Suggestions", params={"userId": alice, "Limit": "3"})
    assert suggestions.status == 200
    assert len(suggestions.body["Items"]) == 3
    assert movies[0].id not in {i["Id"] for i in suggestions.body["Items"]}

    root = await http.get("/Items/Root", params={"userId": alice})
    assert (root.status, root.body["Type"], root.body["IsFolder"]) == (200, "UserRootFolder", True)
    views = await http.get("/Items", params={"userId": alice, "ParentId": root.body["Id"]})
    assert [v["Type"] for v in views.body["Items"]] == ["CollectionFolder"] * 2

    counts = await http.get("/Items/Counts", params={"userId": alice})
    assert (counts.body["MovieCount"], counts.body["EpisodeCount"]) == (len(movies), len(episodes))
    favourites = await http.get("/Items/Counts", params={"userId": alice, "isFavorite": "true"})
    assert (favourites.body["MovieCount"], favourites.body["ItemCount"]) == (1, 1)

    filters = await http.get("/Items/Filters", params={"userId": alice})
    assert movies[0].year in filters.body["Years"]

    folders = await http.get("/Library/MediaFolders")
    assert [f["Type"] for f in folders.body["Items"]] == ["CollectionFolder"] * 2
    # The libraries as an admin configures them: name, collection folder id, folders on disk.
    libraries = await http.get("/Library/VirtualFolders")
    assert [lib["Name"] for lib in libraries.body] == ["Movies", "Shows"]
    assert [lib["ItemId"] for lib in libraries.body] == [f["Id"] for f in folders.body["Items"]]
    movie_folder = libraries.body[0]["Locations"][0]
    assert all((m.path or "").startswith(movie_folder + "/") for m in movies)

    episode = episodes[0]
    ancestors = await http.get(f"/Items/{episode.id}/Ancestors", params={"userId": alice})
    assert [a["Type"] for a in ancestors.body] == ["Season", "Series", "CollectionFolder"]
    bare = await http.get(f"/Items/{episode.id}/Ancestors")
    assert [a["Type"] for a in bare.body] == ["Season", "Series", "Folder"]
    assert (await http.get(f"/Items/{'f' * 32}/Ancestors")).status == 404

    similar = await http.get(f"/Items/{movies[0].id}/Similar", params={"userId": alice})
    assert similar.status == 200
    assert movies[0].id not in {i["Id"] for i in similar.body["Items"]}
    assert {i["Type"] for i in similar.body["Items"]} == {"Movie"}

    artists = await http.get("/Artists", params={"userId": alice})
    assert (artists.status, artists.body["Items"], artists.body["TotalRecordCount"]) == (200, [], 0)


async def test_fixed_names_on_10_8_are_not_item_ids(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await make_emulator(server_version="10.8.13")
    http = Http(session, emu)
    alice = emu.user_id("alice")
    reply = await http.get(f"/Users/{alice}/Items/Latest")
    assert reply.status == 200
    assert isinstance(reply.body, list)
    resume = await http.get(f"/Users/{alice}/Items/Resume")
    assert resume.status == 200
    # 10.8 has no /Items/Latest: an unknown route, a bare 404 (not a 400 for a bad id).
    assert (await http.get("/Items/Latest", params={"userId": alice})).body == ""
