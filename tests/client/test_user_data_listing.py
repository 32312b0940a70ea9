"""The listing a catch-up reads: every item's id and the user's data, once, page by page.

``JellyfinClient.iter_user_data`` lists what ``iter_items`` would, asking for no fields and
validating only ids and user data; a catch-up of a server the library index maps needs nothing
else. Against the emulator over loopback: it finds exactly what the user has, honours the
filters and the library, and pages at the size asked for before each page (a catch-up pages
smaller once live events flow).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from jfsync.emulator import Emulator
from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.wire import UserItemDataDto


def _leaf(emu: Emulator, kind: str = "Movie") -> str:
    return next(i.id for i in emu.leaf_items() if i.type == kind)


async def test_every_item_is_listed_once_with_the_users_data(
    emu: Emulator, client: JellyfinClient
) -> None:
    """bob favourited a film and played an episode: a listing of everything in pages of seven
    gives each leaf item once, with bob's data of it as the server holds it."""
    bob = emu.user_id("bob")
    movie, episode = _leaf(emu), _leaf(emu, "Episode")
    emu.save_user_data(bob, movie, is_favorite=True, rating=8.0)
    emu.save_user_data(bob, episode, played=True, play_count=2)
    listed = [pair async for pair in client.iter_user_data(bob, page_size=7)]
    ids = [item for item, _ in listed]
    assert len(ids) == len(set(ids)), "an item was listed twice"
    assert set(ids) == {i.id for i in emu.leaf_items()}
    assert set(ids) == {i.id async for i in client.iter_items(bob, page_size=7)}
    for item, data in listed:
        assert data == emu.user_data(bob, item)


async def test_filters_and_libraries_are_honoured(emu: Emulator, client: JellyfinClient) -> None:
    bob = emu.user_id("bob")
    movie, episode = _leaf(emu), _leaf(emu, "Episode")
    emu.save_user_data(bob, movie, is_favorite=True)
    emu.save_user_data(bob, episode, played=True, play_count=1)
    favourites = [i async for i, _ in client.iter_user_data(bob, filters=("IsFavorite",))]
    assert favourites == [movie]
    played = dict([p async for p in client.iter_user_data(bob, filters=("IsPlayed",))])
    assert list(played) == [episode]
    assert played[episode] == emu.user_data(bob, episode)
    season = emu.item(episode).season_id
    assert season is not None
    in_season = {i async for i, _ in client.iter_user_data(bob, parent_id=season)}
    assert in_season == {i.id for i in emu.leaf_items() if i.season_id == season}


async def test_the_page_size_is_asked_for_before_each_page(
    emu: Emulator, client: JellyfinClient
) -> None:
    """Pages of 5 items until the listing is a third through, then pages of 2: every item is
    still listed once, each request asked for the size given just before it."""
    alice = emu.user_id("alice")
    total = len(emu.leaf_items())
    listed: list[str] = []
    sizes: list[int] = []

    def page_size() -> int:
        sizes.append(5 if len(listed) < total // 3 else 2)
        return sizes[-1]

    before = len(emu.requests)
    async for item, _ in client.iter_user_data(alice, page_size=page_size):
        listed.append(item)
    assert sorted(listed) == sorted(i.id for i in emu.leaf_items())
    asked = [
        int(r.query["limit"][0])
        for r in emu.requests[before:]
        if r.method == "GET" and r.path.rstrip("/").endswith("/Items")
    ]
    assert asked == sizes
    assert set(sizes) == {5, 2}
    assert all("fields" not in {k.lower() for k in r.query} for r in emu.requests[before:])


async def test_listed_dates_and_missing_fields_read_as_the_servers_own_answer(
    http: aiohttp.ClientSession,
) -> None:
    """A server (or a proxy in front of it) that writes dates with seven fractional digits,
    with an offset or without a zone, leaves keys out or sends an item without user data:
    the user's data read from a listing is what the single-item answer (``UserItemDataDto``)
    of the same fields gives, and an item without user data is left out."""
    dates = [
        "2025-06-01T20:00:00.9999999Z",
        "2025-06-01T22:00:00+02:00",
        "2025-06-01T20:00:00",
        "0001-01-01T00:00:00.0000000Z",
    ]
    entries: list[dict[str, Any]] = [
        {"LastPlayedDate": date, "Played": True, "PlayCount": 2} for date in dates
    ]
    entries += [{"IsFavorite": True}, {"Rating": 7.5, "PlaybackPositionTicks": 99}, {}]
    items = [{"Id": f"{n:032x}", "Name": "x", "UserData": ud} for n, ud in enumerate(entries)]
    items.append({"Id": "f" * 32, "Name": "no data", "UserData": None})

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"Items": items, "TotalRecordCount": len(items)})

    app = web.Application()
    app.router.add_get("/Items", listing)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        client = JellyfinClient("proxied", url, "k" * 32, session=http, device_id="d")
        found = await client.user_data_of("a" * 32, [item["Id"] for item in items])
        listed = dict([pair async for pair in client.iter_user_data("a" * 32)])
    finally:
        await runner.cleanup()
    expected = {
        f"{n:032x}": UserItemDataDto.model_validate(ud).to_user_data()
        for n, ud in enumerate(entries)
    }
    assert found == listed == expected
    assert (
        found[f"{0:032x}"].play_state.last_played_s == found[f"{1:032x}"].play_state.last_played_s
    )
