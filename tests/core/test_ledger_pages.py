"""The ledger's paged catch-up calls give what the whole-user calls give, a page at a time.

A catch-up reads a user's last-known states (:meth:`Ledger.last_known_page`) and queues what a
server has no history of (:meth:`Ledger.backfill_page`) in short steps, so that a live event
never waits behind a whole user. Stepping through every page must give exactly what one call
gives: the same states, the same rows queued, nothing twice, nothing left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jfsync.model import DEFAULT_USER_DATA, PlayState, UserData
from jfsync.sync.ledger import ItemMapping, Ledger, Observation, OutboxRow
from jfsync.sync.merge import MergePolicy

pytestmark = pytest.mark.timeout(30)

POLICY = MergePolicy(servers=("a", "b", "c"))
USER = "alice"
OTHER = "bob"
T0 = 1_700_000_000_000


def state(n: int) -> UserData:
    """A different state for each ``n`` (a few of them the default)."""
    if n % 7 == 0:
        return DEFAULT_USER_DATA
    return UserData(
        favorite=n % 2 == 0,
        rating=float(n % 10) if n % 3 == 0 else None,
        play_state=PlayState(n % 5 == 0, n % 4, None, n * 1000),
    )


async def filled(path: Path) -> Ledger:
    """A ledger where a, b and c each saw some of alice's and bob's items."""
    ledger = await Ledger(path, POLICY).open()
    for server in ("a", "b"):
        await ledger.map_user(server, f"{server}-uid", USER)
        await ledger.map_user(server, f"{server}-bob", OTHER)
    await ledger.apply_observations(
        [Observation("a", USER, f"i{n:03d}", state(n), T0 + n, "scan") for n in range(40)]
        + [Observation("b", USER, f"i{n:03d}", state(n + 1), T0 + n, "scan") for n in range(25)]
        + [Observation("c", USER, f"i{n:03d}", state(n), T0 + n, "scan") for n in range(0, 40, 6)]
        + [Observation("b", OTHER, f"i{n:03d}", state(n), T0 + n, "scan") for n in range(30)]
    )
    # c knows some items (has them), alice is on c from now on.
    await ledger.map_items(
        "c", [ItemMapping(f"c-{n}", f"i{n:03d}", "Movie", None, None) for n in range(0, 40, 2)]
    )
    await ledger.map_user("c", "c-uid", USER)
    return ledger


def rows_of(rows: list[OutboxRow]) -> dict[str, tuple[object, ...]]:
    return {r.item: (r.registers, r.desired, r.user) for r in rows}


async def test_last_known_pages_add_up_to_every_state_of_the_user(tmp_path: Path) -> None:
    ledger = await filled(tmp_path / "l.db")
    try:
        for server in ("a", "b", "c"):
            whole = await ledger.last_known_for_user(server, USER)
            paged: dict[str, UserData] = {}
            after, pages = 0, 0
            while True:
                page, cursor = await ledger.last_known_page(server, USER, after, 4)
                assert len(page) <= 4
                assert not set(page) & set(paged), "an item came twice"
                paged.update(page)
                pages += 1
                if cursor is None:
                    break
                assert len(page) == 4
                after = cursor
            assert paged == whole
            assert pages == len(whole) // 4 + 1
        assert await ledger.last_known_page("a", "nobody") == ({}, None)
        with pytest.raises(ValueError, match="at least one"):
            await ledger.last_known_page("a", USER, 0, 0)
    finally:
        await ledger.close()


@pytest.mark.parametrize("only_mapped", [False, True])
async def test_backfill_in_steps_queues_what_one_backfill_queues(
    tmp_path: Path, only_mapped: bool
) -> None:
    whole = await filled(tmp_path / "whole.db")
    stepped = await filled(tmp_path / "stepped.db")
    try:
        if only_mapped:
            expected = await whole.backfill_mapped("c", USER, T0 + 100)
        else:
            expected = await whole.backfill("c", USER, T0 + 100)
        assert expected > 0
        touched, steps, after = 0, 0, 0
        while True:
            count, cursor = await stepped.backfill_page(
                "c", USER, T0 + 100, after, 3, only_mapped=only_mapped
            )
            touched += count
            steps += 1
            if cursor is None:
                break
            after = cursor
        assert touched == expected
        assert steps > expected // 3
        assert rows_of(await stepped.due_rows("c", 1000, T0 + 200)) == rows_of(
            await whole.due_rows("c", 1000, T0 + 200)
        )
        # A second backfill (one step here) touches what a second whole one touches.
        again = await (
            whole.backfill_mapped("c", USER, T0 + 300)
            if only_mapped
            else whole.backfill("c", USER, T0 + 300)
        )
        assert await stepped.backfill_page(
            "c", USER, T0 + 300, 0, 1000, only_mapped=only_mapped
        ) == (again, None)
        assert await stepped.backfill_page("c", "nobody", T0 + 300) == (0, None)
        assert await stepped.check_invariants() == []
        with pytest.raises(ValueError, match="at least one"):
            await stepped.backfill_page("c", USER, T0, 0, 0)
    finally:
        await whole.close()
        await stepped.close()
