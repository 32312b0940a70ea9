"""A library change re-matches only what it touches, and the result is the full match's.

The user moves, adds and removes items on running servers; after each ``LibraryChanged`` the
service's id map groups every item exactly as a from-scratch index of the same servers does
(a second ledger built in the test), the status counts agree, and the service got there without
matching the whole library again. Favourites keep flowing for the items that changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jfsync.model import UserData
from jfsync.sync import identity as identity_module
from jfsync.sync.identity import IndexedIdentity
from jfsync.sync.ledger import Ledger
from jfsync.sync.merge import MergePolicy
from jfsync.timing import SystemClock
from tests.identity.conftest import MakeStack, Stack, emulator
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

Partition = set[frozenset[tuple[str, str]]]
REWRITES = {"a": [("/mnt/a", "/media")], "b": [("/srv/b", "/media")], "c": [("/opt/c", "/media")]}


def _identity(stack: Stack) -> IndexedIdentity:
    identity = stack.svc().identity
    assert isinstance(identity, IndexedIdentity)
    return identity


async def _partition(identity: IndexedIdentity, stack: Stack) -> Partition:
    """Which items of which servers share a canonical item."""
    groups: dict[str, set[tuple[str, str]]] = {}
    for name, emu in stack.emus.items():
        ids = [item.id for item in emu.leaf_items()]
        for remote, key in (await identity.index.canonical_of(name, ids)).items():
            groups.setdefault(key, set()).add((name, remote))
    return {frozenset(group) for group in groups.values()}


def _counts(status: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("servers", "matched", "unmatched", "ambiguous", "unmatched_by_server")
    return [{k: pair[k] for k in (*keys, "matched_by_rule")} for pair in status["pairs"]]


async def _from_scratch(stack: Stack, path: Path) -> tuple[Partition, list[dict[str, Any]]]:
    """Index the servers as they are now into a new ledger and match everything."""
    config = stack.config.model_copy(update={"ledger": path})
    clients = {name: link.client for name, link in stack.svc().links.items()}
    async with Ledger(config.ledger, MergePolicy.from_config(config)) as ledger:
        identity = IndexedIdentity(config, ledger, SystemClock())
        await identity.start(clients)
        try:
            await identity.refresh()
            return await _partition(identity, stack), _counts(identity.status())
        finally:
            await identity.close()


async def _settles_like_scratch(stack: Stack, path: Path) -> Partition:
    """Wait until the service groups every item, and counts every pair, as a from-scratch
    index of the servers as they are now does."""
    expected, counts = await _from_scratch(stack, path)
    identity = _identity(stack)

    async def same() -> bool:
        if _counts(identity.status()) != counts:
            return False
        return await _partition(identity, stack) == expected

    # The id map moves without any user data being applied: re-check every loop turn.
    await wait_until(same)
    return expected


async def test_changes_are_matched_again_alone_and_as_a_full_match_would(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b"), emulator("c", root="/opt/c")],
        rewrites=REWRITES,
    )
    identity = _identity(stack)
    await _settles_like_scratch(stack, tmp_path / "scratch-0.db")
    full = identity.full_matches
    movies = [
        (x, y, z)
        for (x, y), (_, z) in zip(stack.pairs("a", "b"), stack.pairs("a", "c"), strict=True)
    ]
    movies = [m for m in movies if m[0].type == "Movie" and m[0].provider_ids]
    (x_a, x_b, x_c), (y_a, _, y_c), (z_a, z_b, _) = movies[:3]

    # b's copy of x moves: a new id, a path that matches nothing; its provider ids still do.
    moved = stack.emus["b"].move_item(x_b.id, "/srv/b/Moved/Elsewhere.mkv")
    groups = await _settles_like_scratch(stack, tmp_path / "scratch-1.db")
    assert frozenset({("a", x_a.id), ("b", moved.id), ("c", x_c.id)}) in groups

    # A film arrives on a in two versions and on b under another title, all with the same
    # provider id: neither version can be told apart, so all three are refused.
    ids = {"Tmdb": "880001"}
    cut_1 = stack.emus["a"].add_item("Movie", "Night Ferry", year=2019, provider_ids=ids)
    cut_2 = stack.emus["a"].add_item("Movie", "Night Ferry Extended", year=2019, provider_ids=ids)
    ferry_b = stack.emus["b"].add_item("Movie", "Night Ferry Remastered", provider_ids=ids)
    await _settles_like_scratch(stack, tmp_path / "scratch-2.db")
    assert stack.pair_status("a", "b")["ambiguous"] == 3

    # z leaves a; a brand-new film arrives on a and b.
    stack.emus["a"].remove_item(z_a.id)
    fresh_a = stack.emus["a"].add_item("Movie", "Quiet Harbour", year=2020)
    fresh_b = stack.emus["b"].add_item("Movie", "Quiet Harbour", year=2020)
    groups = await _settles_like_scratch(stack, tmp_path / "scratch-3.db")
    assert frozenset({("a", fresh_a.id), ("b", fresh_b.id)}) in groups
    assert not any(("a", z_a.id) in group for group in groups)
    assert not any(("b", z_b.id) in group and ("a", z_a.id) in group for group in groups)

    # The extended cut goes again: the other version now matches b's alone.
    stack.emus["a"].remove_item(cut_2.id)
    groups = await _settles_like_scratch(stack, tmp_path / "scratch-4.db")
    assert frozenset({("a", cut_1.id), ("b", ferry_b.id)}) in groups
    assert any({("a", y_a.id), ("c", y_c.id)} <= group for group in groups)

    # None of this matched the whole library again, and a full match finds nothing to change.
    assert identity.full_matches == full
    assert identity.partial_matches >= 4
    change = await identity.rematch()
    assert (change.mapped, change.unmapped, change.retired) == (0, 0, 0)

    # Favourites flow for the items that changed.
    stack.change("a", x_a.id, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", moved.id, UserData(favorite=True)))
    stack.change("b", fresh_b.id, rating=7.0)
    await stack.wait(lambda: stack.holds("a", fresh_a.id, UserData(rating=7.0)))


async def test_a_rescan_writes_nothing_new_and_matches_again_only_what_changed(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], rewrites=REWRITES
    )
    identity = _identity(stack)
    await _settles_like_scratch(stack, tmp_path / "scratch-0.db")
    full, partial = identity.full_matches, identity.partial_matches

    # Nothing changed: the rescan stores only each server's scan record, and matches nothing;
    # the status tells when it ended.
    written = identity.index.rows_written
    change = await identity.refresh()
    assert (change.mapped, change.unmapped, change.retired) == (0, 0, 0)
    assert identity.index.rows_written - written == 2
    assert (identity.full_matches, identity.partial_matches) == (full, partial)
    scanned = {n: about["scanned_at_ms"] for n, about in identity.status()["servers"].items()}
    assert scanned == await identity.index.scanned_at()

    # Changes the servers never announced (jfsync was not listening): a file moves on b, a
    # film leaves a, a new one arrives on both.
    movies = [(x, y) for x, y in stack.pairs("a", "b") if x.type == "Movie" and x.provider_ids]
    (x_a, x_b), (y_a, y_b) = movies[:2]
    moved = stack.emus["b"].library.move_item(x_b.id, "/srv/b/Moved/Elsewhere.mkv")
    stack.emus["a"].library.remove_item(y_a.id)
    fresh_a = stack.emus["a"].library.add_item("Movie", "Quiet Harbour", year=2020)
    fresh_b = stack.emus["b"].library.add_item("Movie", "Quiet Harbour", year=2020)
    written = identity.index.rows_written
    await identity.refresh()
    expected, counts = await _from_scratch(stack, tmp_path / "scratch-1.db")
    assert await _partition(identity, stack) == expected
    assert _counts(identity.status()) == counts
    assert frozenset({("a", x_a.id), ("b", moved.id)}) in expected
    assert frozenset({("a", fresh_a.id), ("b", fresh_b.id)}) in expected
    assert not any(("b", y_b.id) in group and len(group) > 1 for group in expected)
    assert (identity.full_matches, identity.partial_matches) == (full, partial + 1)
    # A handful of rows, not the library's: 3 items in, 2 out, their keys, the scratch tables.
    assert identity.index.rows_written - written < 60

    stack.change("a", x_a.id, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", moved.id, UserData(favorite=True)))


async def test_a_change_linked_to_too_much_is_matched_in_full(
    make_stack: MakeStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], rewrites=REWRITES
    )
    identity = _identity(stack)
    await _settles_like_scratch(stack, tmp_path / "scratch-0.db")
    full, partial = identity.full_matches, identity.partial_matches
    # Nothing may be matched alone: any change is matched again in full, with the same result.
    monkeypatch.setattr(identity_module, "INCREMENTAL_LIMIT", 1)
    x_a, x_b = next((x, y) for x, y in stack.pairs("a", "b") if x.type == "Movie")
    moved = stack.emus["b"].move_item(x_b.id, "/srv/b/Moved/Elsewhere.mkv")
    await _settles_like_scratch(stack, tmp_path / "scratch-1.db")
    assert identity.full_matches > full
    assert identity.partial_matches == partial
    stack.change("a", x_a.id, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", moved.id, UserData(favorite=True)))
