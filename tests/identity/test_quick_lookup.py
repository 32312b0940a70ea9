"""A live event's items are mapped on the event loop, and always through the id map as committed.

A small lookup (a user's click: a few ids) reads the ledger through a read-only connection of
its own instead of the lookup connection's thread. These tests take it at its worst moments:
an item re-matched just before a live event of it, a library rescan writing while the user
keeps changing things, a reader that cannot answer; and they check that the service still
delivers what the user did last, and that nothing of the reader is left open at shutdown.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from jfsync.model import UserData
from jfsync.sync import index as index_module
from jfsync.sync.identity import IndexedIdentity
from jfsync.sync.index import LibraryIndex
from jfsync.sync.ledger import ItemMapping, Ledger
from jfsync.sync.merge import MergePolicy
from tests.identity.conftest import MakeStack, Stack, emulator
from tests.support.config import make_config
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

REWRITES = {"a": [("/mnt/a", "/media")], "b": [("/srv/b", "/media")]}


def _identity(stack: Stack) -> IndexedIdentity:
    identity = stack.svc().identity
    assert isinstance(identity, IndexedIdentity)
    return identity


def _open_files(path: Path) -> list[str]:
    """This process's open descriptors on ``path`` (or its WAL and shared-memory files)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


async def test_an_item_matched_again_just_before_its_event_maps_to_its_new_match(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], rewrites=REWRITES
    )
    identity = _identity(stack)
    index = identity.index
    x_a, x_b = next((x, y) for x, y in stack.pairs("a", "b") if x.type == "Movie")
    [x_key] = (await index.canonical_of("a", [x_a.id])).values()

    # What a live event of b's moved copy would map to, read at the worst moments: in the
    # same loop turn as the re-match's commit, right before it and right after it.
    seen: dict[str, dict[str, str]] = {}
    remap = Ledger.remap_items
    moved_id: list[str] = []

    async def spying(self: Ledger, server: str, **kw: Any) -> None:
        if server == "b" and moved_id:
            seen.setdefault("before", await index.canonical_of("b", moved_id))
        await remap(self, server, **kw)
        if server == "b" and moved_id:
            seen["after"] = await index.canonical_of("b", moved_id)

    monkeypatch.setattr(Ledger, "remap_items", spying)
    quick = index.quick_lookups
    # The user moves the file on b (a new id there), then marks it a favourite on b.
    moved = stack.emus["b"].move_item(x_b.id, "/srv/b/Moved/Elsewhere.mkv")
    moved_id.append(moved.id)
    # The id map moves without any user data being applied: re-check every loop turn.
    await wait_until(lambda: "after" in seen)
    assert seen["before"] == {}
    assert seen["after"] == {moved.id: x_key}
    stack.change("b", moved.id, is_favorite=True)
    await stack.wait(lambda: stack.holds("a", x_a.id, UserData(favorite=True)))
    # Those lookups, and the event's, were answered on the loop.
    assert index.quick_lookups >= quick + 3


async def test_changes_made_while_a_rescan_writes_the_index_all_arrive(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a", leaves=60), emulator("b", root="/srv/b", leaves=60)],
        rewrites=REWRITES,
    )
    identity = _identity(stack)
    pairs = stack.pairs("a", "b")
    # New films on both sides: the rescan writes index rows and matches them while the user
    # keeps rating films on a.
    for n in range(5):
        stack.emus["a"].library.add_item("Movie", f"Harbour Lights {n}", year=2001 + n)
        stack.emus["b"].library.add_item("Movie", f"Harbour Lights {n}", year=2001 + n)
    quick = identity.index.quick_lookups
    rescan = asyncio.create_task(identity.refresh())
    try:
        for n, (x_a, _) in enumerate(pairs[:20]):
            stack.change("a", x_a.id, rating=float(n % 9 + 1))
            await asyncio.sleep(0)
        await rescan
    finally:
        await asyncio.gather(rescan, return_exceptions=True)
    for n, (_, x_b) in enumerate(pairs[:20]):
        await stack.wait(
            lambda x_b=x_b, n=n: stack.holds("b", x_b.id, UserData(rating=float(n % 9 + 1)))
        )
    assert identity.index.quick_lookups > quick
    fresh = [i for i in stack.emus["a"].leaf_items() if i.name.startswith("Harbour Lights")]
    stack.change("a", fresh[0].id, is_favorite=True)
    fresh_b = next(i for i in stack.emus["b"].leaf_items() if i.name == fresh[0].name)
    await stack.wait(lambda: stack.holds("b", fresh_b.id, UserData(favorite=True)))


async def test_a_reader_that_cannot_answer_hands_the_lookup_to_the_thread(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], rewrites=REWRITES
    )
    index = _identity(stack).index

    def locked(self: object, sql: str, parameters: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    # Every quick read fails (a lock held by a checkpoint, say): lookups take the thread.
    monkeypatch.setattr(index_module._QuickReader, "_query", locked)
    quick = index.quick_lookups
    pairs = stack.pairs("a", "b")[:3]
    for n, (x_a, _) in enumerate(pairs):
        stack.change("a", x_a.id, is_favorite=True, rating=float(n + 2))
    for n, (_, x_b) in enumerate(pairs):
        await stack.wait(
            lambda x_b=x_b, n=n: stack.holds(
                "b", x_b.id, UserData(favorite=True, rating=float(n + 2))
            )
        )
    assert index.quick_lookups == quick


async def test_nothing_of_the_reader_stays_open_after_a_stop(make_stack: MakeStack) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], rewrites=REWRITES
    )
    ledger = Path(stack.svc().config.ledger)
    x_a, x_b = stack.pairs("a", "b")[0]
    stack.change("a", x_a.id, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", x_b.id, UserData(favorite=True)))
    assert _identity(stack).index.quick_lookups > 0
    assert _open_files(ledger)
    await stack.stop_service()
    assert _open_files(ledger) == []


async def test_a_few_ids_cost_the_same_in_a_small_and_a_large_library(tmp_path: Path) -> None:
    """Mapping a few items each way reads those items, not the server's whole id map (a
    status poll naming a few items of a 100,000-item server took 20-27 ms on the loop)."""
    config = make_config(
        {"a": "http://127.0.0.1:9", "c": "http://127.0.0.1:9"}, ledger=tmp_path / "l.db"
    )
    steps: dict[str, int] = {}
    async with Ledger(config.ledger, MergePolicy.from_config(config)) as ledger:
        for server, size in (("a", 200), ("c", 20_000)):
            for start in range(0, size, 5000):
                await ledger.remap_items(
                    server,
                    mappings=[
                        ItemMapping(f"{server}{n:06d}", f"k{n:06d}")
                        for n in range(start, min(size, start + 5000))
                    ],
                )
        index = LibraryIndex(config.ledger, config.servers)
        await index.open()
        try:
            wanted = [f"k{n:06d}" for n in range(3, 200, 10)]
            for server in ("a", "c"):
                assert await index.remote_of(server, wanted) == {
                    k: f"{server}{k[1:]}" for k in wanted
                }
            conn = index._quick._conn if index._quick is not None else None
            assert conn is not None
            for server in ("a", "c"):
                count = [0]

                def step(count: list[int] = count) -> int:
                    count[0] += 1
                    return 0

                conn.set_progress_handler(step, 10)
                assert len(await index.remote_of(server, wanted)) == len(wanted)
                assert len(await index.canonical_of(server, [f"{server}000077"])) == 1
                conn.set_progress_handler(None, 10)
                steps[server] = count[0]
        finally:
            await index.close()
    # The same few rows read: about the same number of SQLite steps, not 100 times more.
    assert steps["c"] <= 2 * steps["a"] + 20, steps
