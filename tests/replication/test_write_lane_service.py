"""The service's pushers write through each client's write lane (jfsync/jellyfin/lane.py).

The user marks things on a; b shows them. A 404 from b parks that row, a 503 is retried and
lands, a burst lands, all of it sent over the lane's few kept connections; stopping jfsync
closes them.
"""

from __future__ import annotations

import pytest

from jfsync.model import UserData
from tests.replication.conftest import MakeCluster

pytestmark = pytest.mark.timeout(30)


async def test_writes_go_by_the_lane_rejections_park_failures_retry_and_stop_closes_it(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    x, y, *burst = cluster.free_items[:22]
    lane = cluster.service.links["b"].client._lane
    assert lane is not None
    assert lane.usable

    async def dead() -> dict[str, str]:
        status = await cluster.service.status()
        server = next(s for s in status["servers"] if s["name"] == "b")
        return {d["item"]: d["reason"] for d in server["outbox"]["dead"]}

    async def parked() -> bool:
        return x in await dead()

    # The user favourites x on a; b answers 404: the row is parked, with the reason.
    b.fail_next_writes(1, 404)
    cluster.change(a, x, is_favorite=True)
    await cluster.service.wait_for(parked, 20)
    assert "404" in (await dead())[x]
    assert cluster.data(b, x) == UserData()

    # The user rates y; b fails once with 503: the write is tried again and lands.
    b.fail_next_writes(1, 503)
    cluster.change(a, y, rating=7.0)
    await cluster.wait_items([b], [y], UserData(rating=7.0))
    assert [w.status for w in b.writes if w.item_id == y] == [503, 200]

    # A burst: every item lands, over at most 8 connections of the lane.
    for item in burst:
        cluster.change(a, item, is_favorite=True)
    await cluster.wait_items([b], burst, UserData(favorite=True))
    assert 1 <= lane.connections <= 8
    assert lane.usable

    await cluster.service.stop()
    assert lane.connections == 0
    assert not lane.usable
