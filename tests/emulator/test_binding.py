"""Query and body binding as ASP.NET does it (fact sheet Corrections 9): unknown values in enum
lists are dropped with 200, numbers given as strings bind, only a malformed Guid in a Guid
parameter is a 400, and an unknown route is a bare 404."""

from __future__ import annotations

import pytest

from tests.emulator.conftest import Http

pytestmark = pytest.mark.timeout(20)


async def item_ids(http: Http, **params: str) -> list[str]:
    """The ids ``GET /Items`` answers (200 asserted)."""
    reply = await http.get("/Items", params=params)
    assert reply.status == 200, (params, reply.status, reply.body)
    return [i["Id"] for i in reply.body["Items"]]


async def test_unknown_enum_values_are_dropped_and_the_rest_applies(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movies = sorted(i.id for i in emu.leaf_items() if i.type == "Movie")
    base = {"userId": alice, "Recursive": "true"}
    # A made-up kind next to a real one: only Movie applies.
    found = await item_ids(http, **base, IncludeItemTypes="Movie,Spaceship")
    assert sorted(found) == movies
    # Only made-up kinds: no type filter at all (the list binds empty).
    everything = await item_ids(http, **base)
    assert sorted(await item_ids(http, **base, IncludeItemTypes="Spaceship")) == sorted(everything)
    excluded = await item_ids(http, **base, ExcludeItemTypes="Episode,Nonsense,Season,Series")
    assert sorted(excluded) == movies
    # Filters: IsWatched is not an ItemFilter; IsFavorite still filters.
    emu.save_user_data(alice, movies[0], is_favorite=True)
    assert await item_ids(http, **base, Filters="IsWatched,IsFavorite") == [movies[0]]
    # SortBy and SortOrder: the unknown key is ignored, the known one sorts.
    by_name = await item_ids(http, **base, IncludeItemTypes="Movie", SortBy="SortName")
    mixed = await item_ids(
        http, **base, IncludeItemTypes="Movie", SortBy="Loudness,SortName", SortOrder="Upwards"
    )
    assert mixed == by_name
    # Fields: Path is written, the unknown field is not an error.
    reply = await http.get(
        "/Items", params={**base, "IncludeItemTypes": "Movie", "Fields": "Path,Smell"}
    )
    assert reply.status == 200
    assert all("Path" in i for i in reply.body["Items"])
    # A malformed Guid inside the Ids list is dropped like an unknown enum value.
    assert await item_ids(http, Ids=f"{movies[1]},not-a-guid") == [movies[1]]


async def test_numbers_given_as_strings_bind(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    reply = await http.post(
        f"/UserItems/{movie.id}/UserData",
        params={"userId": alice},
        json_body={"PlayCount": "3", "PlaybackPositionTicks": "1200", "Rating": "7.5"},
    )
    assert reply.status == 200, reply.body
    assert (reply.body["PlayCount"], reply.body["PlaybackPositionTicks"]) == (3, 1200)
    assert reply.body["Rating"] == 7.5
    stored = emu.user_data(alice, movie.id)
    assert (stored.play_state.play_count, stored.rating) == (3, 7.5)
    # Text that is not a number is still a 400, and nothing changes.
    bad = await http.post(
        f"/UserItems/{movie.id}/UserData", params={"userId": alice}, json_body={"PlayCount": "x"}
    )
    assert bad.status == 400
    assert emu.user_data(alice, movie.id).play_state.play_count == 3
    # Paging numbers arrive as query text anyway.
    paged = await http.get("/Items", params={"Recursive": "true", "Limit": "2"})
    assert len(paged.body["Items"]) == 2


async def test_only_a_malformed_guid_parameter_is_400(http: Http) -> None:
    alice = http.emu.user_id("alice")
    for params in ({"userId": "nope"}, {"ParentId": "nope"}, {"userId": alice, "ParentId": "1"}):
        reply = await http.get("/Items", params=params)
        assert reply.status == 400, params
    reply = await http.get("/Items", params={"userId": alice, "Filters": "Nope", "Fields": "X"})
    assert reply.status == 200


async def test_an_unknown_route_is_a_bare_404(http: Http) -> None:
    for path in ("/Nope/Nothing", "/Items/Latest/Extra/Bits", "/emby/Nothing"):
        reply = await http.get(path)
        assert (reply.status, reply.body) == (404, ""), path
    wrong_method = await http.call("DELETE", "/System/Info/Public")
    assert (wrong_method.status, wrong_method.body) == (405, "")
