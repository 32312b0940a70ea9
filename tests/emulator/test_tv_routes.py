"""TV and resume routes third-party tools use (fact sheet Corrections 8): ``/Shows/{id}/Episodes``,
``/Shows/{id}/Seasons``, ``/Shows/NextUp`` and the resume lists, with paging and user data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from tests.emulator.conftest import Http, MakeEmulator

pytestmark = pytest.mark.timeout(20)

MISSING = "0123456789abcdef0123456789abcdef"


def a_series(emu: Emulator, seasons: int = 2) -> tuple[LibraryItem, list[LibraryItem]]:
    """A series with at least ``seasons`` seasons, and its episodes in aired order."""
    for series in emu.items:
        if series.type != "Series" or len(emu.library.children(series.id)) < seasons:
            continue
        episodes = [emu.item(i) for i in emu.library.descendants(series.id)]
        aired = sorted(
            (e for e in episodes if e.type == "Episode"),
            key=lambda e: (e.parent_index_number or 0, e.index_number or 0),
        )
        return series, aired
    raise AssertionError(f"no series with {seasons} seasons")


def ids(reply_body: dict[str, object]) -> list[str]:
    """The ids of a QueryResult's items."""
    items = reply_body["Items"]
    assert isinstance(items, list)
    return [str(i["Id"]) for i in items]


async def test_episodes_of_a_series_in_aired_order_with_paging(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    series, aired = a_series(emu)
    emu.save_user_data(alice, aired[1].id, played=True, play_count=1)
    path = f"/Shows/{series.id}/Episodes"
    whole = await http.get(path, params={"userId": alice})
    assert whole.status == 200
    assert ids(whole.body) == [e.id for e in aired]
    assert whole.body["TotalRecordCount"] == len(aired)
    assert whole.body["Items"][1]["UserData"]["Played"] is True
    assert whole.body["Items"][0]["UserData"]["Played"] is False

    page = await http.get(path, params={"userId": alice, "StartIndex": "2", "Limit": "3"})
    assert ids(page.body) == [e.id for e in aired[2:5]]
    assert (page.body["TotalRecordCount"], page.body["StartIndex"]) == (len(aired), 2)

    # startItemId skips to that episode; paging then applies from there.
    start = await http.get(path, params={"userId": alice, "startItemId": aired[3].id, "Limit": "2"})
    assert ids(start.body) == [e.id for e in aired[3:5]]

    # Fields, EnableUserData and a shuffle that keeps every episode.
    fields = await http.get(
        path, params={"userId": alice, "Fields": "Path", "EnableUserData": "false"}
    )
    assert fields.body["Items"][0]["Path"] == aired[0].path
    assert "UserData" not in fields.body["Items"][0]
    shuffled = await http.get(path, params={"userId": alice, "SortBy": "Random"})
    assert sorted(ids(shuffled.body)) == sorted(e.id for e in aired)

    # An API key without a user gets the episodes, without user data.
    bare = await http.get(path)
    assert bare.status == 200
    assert "UserData" not in bare.body["Items"][0]


async def test_episodes_of_one_season_by_number_or_id(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    series, aired = a_series(emu)
    second = [e for e in aired if e.parent_index_number == 2]
    path = f"/Shows/{series.id}/Episodes"
    by_number = await http.get(path, params={"userId": alice, "season": "2"})
    assert ids(by_number.body) == [e.id for e in second]
    by_id = await http.get(path, params={"userId": alice, "seasonId": second[0].season_id or ""})
    assert ids(by_id.body) == [e.id for e in second]
    # An unknown season number is an empty answer, not a 404.
    none = await http.get(path, params={"userId": alice, "season": "99"})
    assert (none.status, none.body["Items"], none.body["TotalRecordCount"]) == (200, [], 0)
    # Every emulated episode has its file.
    missing = await http.get(path, params={"userId": alice, "isMissing": "true"})
    assert missing.body["Items"] == []
    present = await http.get(path, params={"userId": alice, "isMissing": "false"})
    assert len(present.body["Items"]) == len(aired)


async def test_unknown_series_or_season_id_is_404(http: Http) -> None:
    emu = http.emu
    series, _ = a_series(emu)
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    assert (await http.get(f"/Shows/{MISSING}/Episodes")).status == 404
    assert (await http.get(f"/Shows/{movie.id}/Episodes")).status == 404
    assert (await http.get(f"/Shows/{MISSING}/Seasons")).status == 404
    reply = await http.get(f"/Shows/{series.id}/Episodes", params={"seasonId": MISSING})
    assert reply.status == 404
    assert (await http.get("/Shows/not-a-guid/Episodes")).status == 400


async def test_seasons_in_order_with_folder_user_data(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    series, aired = a_series(emu)
    first_season = [e for e in aired if e.parent_index_number == 1]
    for episode in first_season:
        emu.save_user_data(alice, episode.id, played=True)
    reply = await http.get(
        f"/Shows/{series.id}/Seasons", params={"userId": alice, "Fields": "RecursiveItemCount"}
    )
    assert reply.status == 200
    seasons = reply.body["Items"]
    assert [s["IndexNumber"] for s in seasons] == sorted(s["IndexNumber"] for s in seasons)
    assert reply.body["TotalRecordCount"] == len(seasons) >= 2
    one, two = seasons[0], seasons[1]
    assert (one["UserData"]["Played"], one["UserData"]["PlayedPercentage"]) == (True, 100)
    assert one["RecursiveItemCount"] == len(first_season)
    assert two["UserData"]["Played"] is False
    assert two["UserData"]["UnplayedItemCount"] == two["RecursiveItemCount"]


async def test_next_up_is_the_episode_after_the_last_played(http: Http) -> None:
    emu = http.emu
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    series, aired = a_series(emu)
    other = emu.add_item("Series", "Other Show", year=2020)
    other_season = emu.add_item("Season", "Season 1", parent_id=other.id)
    other_aired = [emu.add_item("Episode", f"E{n}", parent_id=other_season.id) for n in (1, 2)]
    when = datetime(2025, 1, 1, tzinfo=UTC)
    # Alice watched episodes 1 and 3 (skipping 2): next up is 4, not 2.
    emu.save_user_data(alice, aired[0].id, played=True, last_played=when)
    emu.save_user_data(alice, aired[2].id, played=True, last_played=when)
    reply = await http.get("/Shows/NextUp", params={"userId": alice})
    assert reply.status == 200
    assert ids(reply.body) == [aired[3].id]
    assert reply.body["Items"][0]["UserData"]["Played"] is False
    # Bob has watched nothing: nothing is next up for him...
    assert ids((await http.get("/Shows/NextUp", params={"userId": bob})).body) == []
    # ...unless he asks for one series: its first episode, or nothing without first episodes.
    for_series = await http.get("/Shows/NextUp", params={"userId": bob, "seriesId": series.id})
    assert ids(for_series.body) == [aired[0].id]
    no_first = await http.get(
        "/Shows/NextUp",
        params={"userId": bob, "seriesId": series.id, "disableFirstEpisode": "true"},
    )
    assert ids(no_first.body) == []

    # Alice starts the other series later: it comes first (most recently watched first).
    emu.save_user_data(alice, other_aired[0].id, played=True, last_played=when + timedelta(1))
    both = await http.get("/Shows/NextUp", params={"userId": alice})
    expected = [other_aired[1].id, aired[3].id]
    assert ids(both.body) == expected
    assert both.body["TotalRecordCount"] == len(expected)
    paged = await http.get("/Shows/NextUp", params={"userId": alice, "Limit": "1"})
    assert ids(paged.body) == expected[:1]
    # Once the last episode is played the series has nothing next up.
    emu.save_user_data(alice, aired[-1].id, played=True, last_played=when)
    after = await http.get("/Shows/NextUp", params={"userId": alice, "seriesId": series.id})
    assert ids(after.body) == []


async def test_resume_lists_items_with_a_position_last_played_first(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    for version in ("10.8.13", "10.10.7", "10.11.11"):
        emu = await make_emulator(server_version=version)
        http = Http(session, emu)
        alice, bob = emu.user_id("alice"), emu.user_id("bob")
        movie = next(i for i in emu.leaf_items() if i.type == "Movie")
        episode = next(i for i in emu.leaf_items() if i.type == "Episode")
        done = [i for i in emu.leaf_items() if i.type == "Movie"][1]
        early, late = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC)
        emu.save_user_data(alice, movie.id, position_ticks=10**9, last_played=early)
        emu.save_user_data(alice, episode.id, position_ticks=10**9, last_played=late)
        emu.save_user_data(alice, done.id, played=True, last_played=late)
        paths = [f"/Users/{alice}/Items/Resume"]
        if version != "10.8.13":
            paths.append("/UserItems/Resume")
        else:
            reply = await http.get("/UserItems/Resume", params={"userId": alice})
            assert reply.status == 404, version
        for path in paths:
            reply = await http.get(path, params={"userId": alice})
            assert reply.status == 200, (version, path)
            assert ids(reply.body) == [episode.id, movie.id]
            assert reply.body["Items"][0]["UserData"]["PlaybackPositionTicks"] == 10**9
            movies_only = await http.get(
                path, params={"userId": alice, "IncludeItemTypes": "Movie", "Limit": "5"}
            )
            assert ids(movies_only.body) == [movie.id]
            paged = await http.get(path, params={"userId": alice, "Limit": "1"})
            assert ids(paged.body) == [episode.id]
            assert paged.body["TotalRecordCount"] == 2
        bob_reply = await http.get(f"/Users/{bob}/Items/Resume")
        assert bob_reply.body["Items"] == []
