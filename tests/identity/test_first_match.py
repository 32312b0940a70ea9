"""A first match sets a later server's mappings aside and records them together; cut short, it
settles like a clean one.

The groups of a first match come in the order of the earliest server's ids, so that server's
mappings are written chunk after chunk; a later server's come in no order of its own ids, so
while it has no mapping yet they are set aside (outside the ledger file) and recorded in one
transaction at the end. Here jfsync is cut off right before that transaction (the files left on
disk are what a crash leaves: a's mappings, none of b's): at the next start every item is
matched as a clean match of the servers matches it, and favourites flow both ways. On the
ledger itself: mappings set aside are recorded only all together, as ``map_items`` records
them, never fewer than were set aside, and a pass cut short leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from jfsync.model import UserData
from jfsync.service import SyncService
from jfsync.sync import identity as identity_module
from jfsync.sync.identity import IndexedIdentity
from jfsync.sync.ledger import ItemMapping, Ledger, LedgerError
from jfsync.sync.merge import MergePolicy
from tests.identity.conftest import WAIT_S, MakeStack, emulator
from tests.identity.test_incremental import REWRITES, _identity, _partition, _settles_like_scratch
from tests.identity.test_index_file import _on_disk, _put_back, _rows

pytestmark = pytest.mark.timeout(60)


def _mapped(rows: list[Any], sid: int) -> int:
    return sum(1 for row in rows if row[0] == sid)


async def test_a_first_match_cut_short_before_b_is_recorded_settles_like_a_clean_one(
    make_stack: MakeStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of five mappings: a's 24 items take several transactions, b's are set aside in
    # several before the one that records them.
    monkeypatch.setattr(identity_module, "REMAP_CHUNK", 5)
    paused = asyncio.Event()
    release = asyncio.Event()
    calls: list[dict[str, Any]] = []

    def held(service: SyncService) -> IndexedIdentity:
        ledger = service.ledger
        plain = ledger.remap_items

        async def remap_items(server: str, **changes: Any) -> None:
            calls.append({"server": server, **changes})
            if changes.get("staged") is not None and not release.is_set():
                paused.set()
                await release.wait()
            await plain(server, **changes)

        monkeypatch.setattr(ledger, "remap_items", remap_items)
        return IndexedIdentity(service.config, ledger, service.clock)

    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], rewrites=REWRITES, start=False
    )
    await stack.start_service(identity=held, connect=False)
    async with asyncio.timeout(WAIT_S):
        await paused.wait()
    ledger = Path(stack.config.ledger)
    left = _on_disk(ledger)
    release.set()
    await stack.stop_service()

    # What a crash right then leaves: every item of a mapped, none of b's.
    _put_back(ledger, left)
    mapped = _rows(ledger, ["server_items"])["server_items"]
    assert _mapped(mapped, 1) == 24
    assert _mapped(mapped, 2) == 0
    staged = [c for c in calls if c["server"] == "b"]
    assert len(staged) > 1
    assert all(not c.get("mappings") for c in staged)
    assert sum(len(c.get("stage", ())) for c in staged) == 24

    await stack.start_service()
    await stack.wait(lambda: stack.pair_status("a", "b")["matched"] == 24)
    await _settles_like_scratch(stack, tmp_path / "scratch.db")
    (x_a, x_b), (y_a, y_b) = stack.pairs("a", "b")[:2]
    stack.change("a", x_a.id, is_favorite=True)
    stack.change("b", y_b.id, is_favorite=True)
    await stack.wait(lambda: stack.holds("b", x_b.id, UserData(favorite=True)))
    await stack.wait(lambda: stack.holds("a", y_a.id, UserData(favorite=True)))


async def test_mappings_set_aside_are_recorded_all_together_or_not_at_all(
    tmp_path: Path,
) -> None:
    ledger = await Ledger(tmp_path / "ledger.db", MergePolicy(servers=("a", "b"))).open()
    try:
        await ledger.map_items("b", [ItemMapping("b-old", "k1", "Movie")])
        await ledger.remap_items(
            "b",
            stage=[ItemMapping("b-1", "k1", "Movie"), ItemMapping("b-2", "k2", "Episode")],
            fresh_stage=True,
        )
        await ledger.remap_items("b", stage=[ItemMapping("b-3", "k3", "Movie")])
        # Set aside, not recorded: b-old still maps k1.
        assert await ledger.item_for("b", "b-1") is None
        assert await ledger.item_for("b", "b-old") == "k1"

        # Asked to record more than were set aside: refused, nothing recorded.
        with pytest.raises(LedgerError, match=r"4 item mappings of server 'b'.* 3 are there"):
            await ledger.remap_items("b", staged=4)
        assert await ledger.item_for("b", "b-1") is None

        await ledger.remap_items("b", staged=3)
        # As map_items records them: b-1 took k1 over from b-old.
        assert await ledger.item_for("b", "b-1") == "k1"
        assert await ledger.item_for("b", "b-2") == "k2"
        assert await ledger.item_for("b", "b-3") == "k3"
        assert await ledger.item_for("b", "b-old") is None

        # A pass cut short leaves what it set aside; the next pass starts afresh without it.
        await ledger.remap_items("b", stage=[ItemMapping("b-9", "k9")], fresh_stage=True)
        await ledger.remap_items("b", stage=[ItemMapping("b-4", "k4")], fresh_stage=True, staged=1)
        assert await ledger.item_for("b", "b-4") == "k4"
        assert await ledger.item_for("b", "b-9") is None
        # Nothing is left over once recorded.
        await ledger.remap_items("b", staged=0)
        assert await ledger.check_invariants() == []
    finally:
        await ledger.close()


async def test_a_whole_rematch_after_the_first_changes_no_mapping(make_stack: MakeStack) -> None:
    # The user's two servers, matched once; then a whole rematch (a library refresh that
    # cannot be matched incrementally, or a second `jfsync reconcile`) finds every mapping
    # as it is: no item moves to another key, none is dropped, and the keys it goes by are
    # the ones each server already holds.
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], rewrites=REWRITES
    )
    identity = _identity(stack)
    before = await _partition(identity, stack)
    assert len(before) == 24
    assert all(len(group) == 2 for group in before)
    held = await identity.index.mapped_keys()
    assert set(held["a"]) == set(held["b"])
    assert len(held["a"]) == 24
    # A whole library's keys: kept where the cyclic garbage collector never walks them (its
    # passes over three sets of 200,000 keys held the event loop about 50 ms each).
    assert not any(gc.is_tracked(keys) for keys in held.values())

    change = await identity.rematch()

    assert (change.mapped, change.unmapped, change.retired) == (0, 0, 0)
    assert await _partition(identity, stack) == before
    assert await identity.index.mapped_keys() == held
