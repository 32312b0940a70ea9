"""A catch-up reads and queues a page at a time; a change the user makes between two pages wins.

While events flow, a catch-up reads the last-known states of the user it catches up a page per
ledger call, and queues what the server has no history of a range of items per transaction
(:mod:`jfsync.sync.reconcile`), so that a live event waits for one page, never for the whole
user. A live change can therefore land between two pages. The pages are made tiny here (two
items), and the user's change is made while the catch-up is held between its first and second
page: what is asserted is order, never time.
"""

from __future__ import annotations

from typing import Any

import pytest

from jfsync.model import UserData
from jfsync.sync import reconcile as reconcile_module
from tests.replication.conftest import MakeCluster
from tests.replication.harness import USER_KEY, Cluster

pytestmark = pytest.mark.timeout(60)

ITEMS = 10
FAVOURITE = UserData(favorite=True)
NOT_FAVOURITE = UserData()


@pytest.fixture(autouse=True)
def tiny_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile_module, "READ_PAGE", 2)
    monkeypatch.setattr(reconcile_module, "LIVE_READ_PAGE", 2)


async def favourites_everywhere(cluster: Cluster) -> dict[str, str]:
    """The user favourites ITEMS films on a; once every server shows them, return canonical
    key -> a's item id."""
    items = cluster.free_items[:ITEMS]
    for item in items:
        cluster.change("a", item, is_favorite=True)
    for item in items:
        await cluster.wait_all_hold(item, FAVOURITE)
    await cluster.settle()
    return {await cluster.key("a", item): item for item in items}


async def canonical_is(cluster: Cluster, key: str, expected: UserData) -> bool:
    state = await cluster.service.ledger.canonical(USER_KEY, key)
    return state is not None and state.data == expected


async def test_a_change_between_two_pages_of_known_states_wins(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b is caught up (its listing shows every film a favourite). Between the first and the
    second page of what jfsync knew b to hold, the user un-favourites, on a, a film of a later
    page. The listing, asked for before that change, still shows it a favourite on b: it must
    not make it a favourite again anywhere."""
    cluster = await make_cluster(2, leaves=ITEMS + 10)
    b = cluster.emu("b")
    by_key = await favourites_everywhere(cluster)
    ledger = cluster.service.ledger
    read_page = ledger.last_known_page
    pages: list[set[str]] = []
    changed: list[str] = []

    async def page_then_change(*args: Any, **kwargs: Any) -> tuple[dict[str, UserData], int | None]:
        states, cursor = await read_page(*args, **kwargs)
        if args[0] == "b":
            pages.append(set(states))
            if len(pages) == 1:
                later = sorted(set(by_key) - pages[0])[0]
                changed.append(later)
                # The user's change, applied and delivered before the second page is read.
                cluster.change("a", by_key[later], is_favorite=False)
                await cluster.wait_all_hold(by_key[later], NOT_FAVOURITE)
        return states, cursor

    monkeypatch.setattr(ledger, "last_known_page", page_then_change)
    result = await cluster.service.reconciler.catch_up("b", cluster.uid(b), USER_KEY)
    assert len(pages) >= ITEMS // 2, "the known states were not read in pages"
    assert changed
    assert changed[0] in set().union(*pages[1:])
    assert result.changed == 0
    await cluster.settle()
    (later,) = changed
    assert cluster.all_hold(by_key[later], NOT_FAVOURITE)
    assert await canonical_is(cluster, later, NOT_FAVOURITE)
    assert all(cluster.all_hold(item, FAVOURITE) for key, item in by_key.items() if key != later)


async def test_a_change_between_two_backfill_steps_wins(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b comes back as a new server (its data gone, jfsync's history of it forgotten): the
    catch-up queues every favourite for it, two films per step. Between the first and the
    second step the user un-favourites on a one film already queued for b and one still to
    come. Both end up not favourites everywhere; every other film is a favourite on b again."""
    cluster = await make_cluster(2, leaves=ITEMS + 10)
    b = cluster.emu("b")
    by_key = await favourites_everywhere(cluster)
    ledger = cluster.service.ledger
    assert b.wipe_user_data(cluster.uid(b)) >= ITEMS
    await ledger.forget_server_history("b")
    backfill_page = ledger.backfill_page
    steps = 0
    changed: list[str] = []

    async def step_then_change(*args: Any, **kwargs: Any) -> tuple[int, int | None]:
        nonlocal steps
        touched, cursor = await backfill_page(*args, **kwargs)
        if args[0] == "b":
            steps += 1
            if steps == 1:
                assert touched, "the first step queued nothing"
                queued = [k for k in sorted(by_key) if await ledger.get_row("b", USER_KEY, k)]
                waiting = [
                    k
                    for k in sorted(by_key)
                    if await ledger.get_row("b", USER_KEY, k) is None
                    and await ledger.last_known("b", USER_KEY, k) is None
                ]
                assert queued
                assert waiting
                changed.extend([queued[0], waiting[-1]])
                for key in changed:
                    cluster.change("a", by_key[key], is_favorite=False)
                for key in changed:
                    await cluster.wait(lambda key=key: canonical_is(cluster, key, NOT_FAVOURITE))
        return touched, cursor

    monkeypatch.setattr(ledger, "backfill_page", step_then_change)
    result = await cluster.service.reconciler.catch_up("b", cluster.uid(b), USER_KEY)
    assert steps >= ITEMS // 2, "the backfill was not done in steps"
    assert result.queued >= ITEMS - len(changed)
    await cluster.settle()
    rest = [item for key, item in by_key.items() if key not in changed]
    await cluster.wait_items([b], rest, FAVOURITE)
    for key in changed:
        assert cluster.all_hold(by_key[key], NOT_FAVOURITE)
        assert await canonical_is(cluster, key, NOT_FAVOURITE)
    assert all(cluster.all_hold(item, FAVOURITE) for item in rest)
