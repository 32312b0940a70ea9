"""A peer that is down queues at most one row per item, and catches up when it returns."""

from __future__ import annotations

from collections import Counter

import pytest

from jfsync.model import PlayState, UserData
from tests.replication.conftest import MakeCluster

pytestmark = pytest.mark.timeout(60)

ITEMS = 500
ROUNDS = 10


async def test_peer_down_for_a_burst_of_5000_changes_holds_500_rows_then_converges(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3, leaves=ITEMS + 10)
    a, b, c = cluster.emus
    service = cluster.service
    items = cluster.free_items[:ITEMS]
    await b.stop_listener()

    depths: list[int] = []
    for n in range(1, ROUNDS + 1):
        # One change per item per round: 10 x 500 = 5,000 changes, all on a.
        for item in items:
            cluster.change(a, item, play_count=n, is_favorite=n % 2 == 1, rating=float(n))
        latest = UserData(n % 2 == 1, float(n), PlayState(play_count=n))
        # c stays up and keeps receiving while b is down.
        await cluster.wait_items([c], items, latest, timeout_s=30)
        depths.append(await service.ledger.outbox_depth("b"))
    assert max(depths) <= ITEMS, depths
    assert depths[-1] == ITEMS
    assert not b.writes
    status = await service.status()
    peer_b = next(s for s in status["servers"] if s["name"] == "b")
    assert peer_b["outbox"]["depth"] == ITEMS

    await b.start_listener()
    await cluster.wait_items([b], items, latest, timeout_s=30)
    await cluster.settle()
    assert await service.ledger.outbox_depth("b") == 0
    # The queue was coalesced: each item was written to b once, with its latest state.
    assert Counter(w.item_id for w in cluster.writes(b, items)) == Counter(dict.fromkeys(items, 1))
    assert all(cluster.data(e, i) == latest for e in cluster.emus for i in items)
