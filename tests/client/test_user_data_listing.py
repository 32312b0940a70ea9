"""The listing a catch-up reads: every item's id and the user's data, once, page by page.

``JellyfinClient.iter_user_data`` lists what ``iter_items`` would, asking for no fields and
validating only ids and user data; a catch-up of a server the library index maps needs nothing
else. Against the emulator over loopback: it finds exactly what the user has, honours the
filters and the library, and pages at the size asked for before each page (a catch-up pages
smaller once live events flow).
"""

from __future__ import annotations

from jfsync.emulator import Emulator
from jfsync.jellyfin.api import JellyfinClient


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
