"""Servers whose items have different ids still sync: by rewritten path, then by provider ids.

Two emulators hold the same titles under different path roots, so every item id differs (ids
derive from type and path). jfsync matches them through its library index; changes made on
either server reach the other's own item. A provider id shared by two items on one server is
refused and reported, and nothing is read or written for those items.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from jfsync.model import PlayState, UserData
from jfsync.sync.ledger import Ledger
from tests.identity.conftest import MakeStack, Stack, emulator

pytestmark = pytest.mark.timeout(40)

PLAYED = PlayState(played=True, play_count=1, last_played_s=1_735_732_800)


def movies_and_episodes(
    stack: Stack, skip: set[str] | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(id on a, id on b) of every movie and every episode."""
    pairs = stack.pairs("a", "b", skip)
    movies = [(x.id, y.id) for x, y in pairs if x.type == "Movie"]
    episodes = [(x.id, y.id) for x, y in pairs if x.type == "Episode"]
    assert movies
    assert episodes
    return movies, episodes


async def test_different_roots_sync_through_path_rewrites(make_stack: MakeStack) -> None:
    # No provider ids at all: only the rewritten paths can tell which items are the same.
    stack = await make_stack(
        [
            emulator("a", root="/mnt/nas/media", provider_ids=False),
            emulator("b", root="/srv/jellyfin", provider_ids=False),
        ],
        rewrites={"a": [("/mnt/nas/media", "/media")], "b": [("/srv/jellyfin", "/media")]},
    )
    movies, episodes = movies_and_episodes(stack)
    assert all(x != y for x, y in movies + episodes)
    (movie_a, movie_b), (ep_a, ep_b) = movies[0], episodes[0]
    stack.change("a", movie_a, is_favorite=True, rating=8.0)
    stack.change("b", ep_b, played=True, play_count=1, last_played=_date(PLAYED))
    await stack.wait(
        lambda: (
            stack.holds("b", movie_b, UserData(favorite=True, rating=8.0))
            and stack.holds("a", ep_a, UserData(play_state=PLAYED))
        )
    )
    pair = stack.pair_status("a", "b")
    total = len(movies) + len(episodes)
    assert (pair["matched"], pair["unmatched"], pair["ambiguous"]) == (total, 0, 0)
    assert pair["matched_by_rule"] == {"id": 0, "path": total, "provider": 0}


async def test_different_paths_without_rewrites_sync_through_provider_ids(
    make_stack: MakeStack,
) -> None:
    def add_unnumbered_ids_episode(stack: Stack) -> None:
        # An episode with no ids of its own: only its series' ids, season and number match it.
        for emu in stack.emus.values():
            series = next(i for i in emu.items if i.type == "Series")
            season = emu.add_item("Season", "Season 9", parent_id=series.id, index_number=9)
            emu.add_item("Episode", "Special", parent_id=season.id, index_number=1)

    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")],
        before_start=add_unnumbered_ids_episode,
    )
    movies, episodes = movies_and_episodes(stack)
    special_a, special_b = (
        next(i.id for i in emu.leaf_items() if i.name == "Special") for emu in stack.emus.values()
    )
    assert not stack.emus["a"].item(special_a).provider_ids
    (movie_a, movie_b), (ep_a, ep_b) = movies[1], episodes[1]
    stack.change("b", movie_b, is_favorite=True)
    stack.change("a", ep_a, position_ticks=12_000_000_000)
    stack.change("b", special_b, rating=3.0)
    await stack.wait(
        lambda: (
            stack.holds("a", movie_a, UserData(favorite=True))
            and stack.holds(
                "b", ep_b, UserData(play_state=PlayState(position_ticks=12_000_000_000))
            )
            and stack.holds("a", special_a, UserData(rating=3.0))
        )
    )
    pair = stack.pair_status("a", "b")
    total = len(movies) + len(episodes)
    assert (pair["matched"], pair["unmatched"], pair["ambiguous"]) == (total, 0, 0)
    assert pair["matched_by_rule"]["provider"] == total


async def test_a_duplicated_provider_id_is_refused_reported_and_never_written(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture
) -> None:
    duplicate: dict[str, str] = {}

    def add_copy_on_b(stack: Stack) -> None:
        # b holds a second file of the first movie (another edition) with the same ids.
        b = stack.emus["b"]
        original = next(i for i in b.leaf_items() if i.type == "Movie")
        copy = b.add_item(
            "Movie",
            original.name,
            year=original.year,
            path=f"/srv/b/movies/{original.name} (Director's Cut)/{original.name}.mkv",
            provider_ids=dict(original.provider_ids),
        )
        duplicate.update(original=original.id, copy=copy.id)

    caplog.set_level(logging.WARNING, logger="jfsync.sync.identity")
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")],
        before_start=add_copy_on_b,
    )
    movies, _ = movies_and_episodes(stack, {duplicate["copy"]})
    refused_a = next(x for x, y in movies if y == duplicate["original"])
    control_a, control_b = movies[2]
    refused = {refused_a, duplicate["original"], duplicate["copy"]}

    pair = stack.pair_status("a", "b")
    assert pair["ambiguous"] == 3
    assert {s["id"] for s in pair["samples"]["ambiguous"]} == refused
    assert stack.svc().identity_status()["pairs"][0]["ambiguous"] == 3
    assert any("matches more than one item" in r.getMessage() for r in caplog.records)

    # Changes on every refused item, then a control change after them on the same sockets:
    # once the controls arrived, the refused items' events have been handled.
    stack.change("a", refused_a, is_favorite=True)
    stack.change("b", duplicate["copy"], played=True, play_count=1, last_played=_date(PLAYED))
    stack.change("a", control_a, rating=6.0)
    stack.change("b", control_b, is_favorite=True)
    await stack.wait(
        lambda: (
            stack.holds("b", control_b, UserData(favorite=True, rating=6.0))
            and stack.holds("a", control_a, UserData(favorite=True, rating=6.0))
        )
    )
    assert stack.writes("a", refused) == []
    assert stack.writes("b", refused) == []
    # b is a 10.10 server: the copy shares one user-data record with the original (same
    # provider ids, fact sheet Corrections 10), so the user's change shows on both there;
    # jfsync wrote neither (above).
    assert stack.data("b", duplicate["original"]) == stack.data("b", duplicate["copy"])
    assert stack.data("a", refused_a) == UserData(favorite=True)
    ledger = stack.svc().ledger
    for item in refused:
        assert await ledger.canonical("name:alice", item) is None


async def test_an_item_on_one_server_only_is_delivered_when_it_appears(
    make_stack: MakeStack,
) -> None:
    extra: dict[str, str] = {}

    def add_only_on_a(stack: Stack) -> None:
        movie = stack.emus["a"].add_item(
            "Movie", "Northern Lantern", year=2021, provider_ids={"Tmdb": "990001"}
        )
        extra["a"] = movie.id

    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")],
        before_start=add_only_on_a,
    )
    pair = stack.pair_status("a", "b")
    assert pair["unmatched_by_server"] == {"a": 1, "b": 0}
    assert [s["id"] for s in pair["samples"]["unmatched"]] == [extra["a"]]

    stack.change("a", extra["a"], is_favorite=True, rating=9.0)
    ledger = stack.svc().ledger
    await stack.wait(lambda: _canonical_is(ledger, extra["a"], UserData(favorite=True, rating=9.0)))
    # b does not have the film: it is owed nothing yet, so no queue row and no dead row that
    # would make `jfsync status` report a problem.
    assert await ledger.get_row("b", "name:alice", extra["a"]) is None
    assert await ledger.dead_rows("b") == []

    # b gets the film later (another path, same ids): its LibraryChanged brings it in.
    added = stack.emus["b"].add_item(
        "Movie", "Northern Lantern", year=2021, provider_ids={"Tmdb": "990001"}
    )
    await stack.wait(lambda: stack.holds("b", added.id, UserData(favorite=True, rating=9.0)))
    assert stack.pair_status("a", "b")["unmatched"] == 0


async def _canonical_is(ledger: Ledger, item: str, expected: UserData) -> bool:
    state = await ledger.canonical("name:alice", item)
    return state is not None and state.data == expected


def _date(state: PlayState) -> datetime:
    assert state.last_played_s is not None
    return datetime.fromtimestamp(state.last_played_s, tz=UTC)
