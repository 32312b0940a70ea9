"""A peer that refuses jfsync's key is paused, a write it rejects is parked, the rest flows.

401/403 pause the peer with a visible reason; it resumes by itself once writes work again.
400/404 park that one row as dead, listed with its reason on the status snapshot; a newer
change revives it. Meanwhile every other server keeps receiving changes.
"""

from __future__ import annotations

from typing import Any

import pytest

from jfsync.model import UserData
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import Cluster

pytestmark = pytest.mark.timeout(30)

#: How long a paused pusher waits before asking the peer again (on the ManualClock).
AUTH_RETRY_S = 60.0


async def peer_status(cluster: Cluster, name: str) -> dict[str, Any]:
    """The status snapshot of one server as a peer (its outbox section)."""
    status = await cluster.service.status()
    server = next(s for s in status["servers"] if s["name"] == name)
    outbox: dict[str, Any] = server["outbox"]
    return outbox


@pytest.mark.parametrize("refusal", [401, 403])
async def test_refused_key_pauses_the_peer_and_it_resumes_by_itself(
    make_cluster: MakeCluster, refusal: int
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(3, clock=clock, pusher_options={"auth_retry_s": AUTH_RETRY_S})
    a, b, c = cluster.emus
    x, y = cluster.free_items[:2]
    b.fail_next_writes(1000, refusal)

    cluster.change(a, x, is_favorite=True)

    async def paused() -> bool:
        return (await peer_status(cluster, "b"))["pause_reason"] is not None

    await cluster.service.wait_for(paused, 20)
    reason = (await peer_status(cluster, "b"))["pause_reason"]
    assert "b" in reason
    assert "api_key" in reason

    # The other peer keeps receiving while b is paused.
    cluster.change(a, y, rating=9.0)
    await cluster.service.wait_for(lambda: cluster.data(c, y) == UserData(rating=9.0), 20)
    assert cluster.data(c, x) == UserData(favorite=True)
    assert await paused()
    assert cluster.data(b, x) == UserData()
    assert cluster.data(b, y) == UserData()
    assert (await peer_status(cluster, "b"))["depth"] == 2

    # The key works again; after the retry period the peer catches up on its own.
    b.fail_next_writes(0)
    await clock.advance(AUTH_RETRY_S)
    await cluster.service.wait_for(
        lambda: (
            cluster.all_hold(x, UserData(favorite=True))
            and cluster.all_hold(y, UserData(rating=9.0))
        ),
        20,
    )
    assert not await paused()
    assert (await peer_status(cluster, "b"))["depth"] == 0


async def test_rejected_writes_are_parked_with_reasons_and_the_rest_flows(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3)
    a, b, c = cluster.emus
    x, y, z = cluster.free_items[:3]

    async def dead_items() -> dict[str, str]:
        return {d["item"]: d["reason"] for d in (await peer_status(cluster, "c"))["dead"]}

    async def parked(*items: str) -> bool:
        return set(items) <= set(await dead_items())

    c.fail_next_writes(1, 400)
    cluster.change(a, x, is_favorite=True)
    await cluster.service.wait_for(lambda: parked(x), 20)
    c.fail_next_writes(1, 404)
    cluster.change(a, y, rating=3.0)
    await cluster.service.wait_for(lambda: parked(x, y), 20)

    # Both still reached b; z reaches c as usual.
    cluster.change(a, z, is_favorite=True)
    await cluster.service.wait_for(lambda: cluster.all_hold(z, UserData(favorite=True)), 20)
    assert cluster.data(b, x) == UserData(favorite=True)
    assert cluster.data(b, y) == UserData(rating=3.0)
    assert cluster.data(c, x) == UserData()
    assert cluster.data(c, y) == UserData()
    reasons = await dead_items()
    assert set(reasons) == {x, y}
    assert "400" in reasons[x]
    assert "404" in reasons[y]
    peer = await peer_status(cluster, "c")
    assert peer["depth"] == 0  # dead rows are not counted as queued, but listed

    # A newer change of x revives its row: c gets x's whole state.
    cluster.change(a, x, rating=5.0)
    await cluster.service.wait_for(
        lambda: cluster.all_hold(x, UserData(favorite=True, rating=5.0)), 20
    )
    assert set(await dead_items()) == {y}


async def test_an_unexpected_error_in_a_round_is_shown_and_delivery_goes_on(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    cluster = await make_cluster(3, clock=clock)
    a, b, c = cluster.emus
    x = cluster.free_items[0]
    ledger = cluster.service.ledger
    real_compare = ledger.observe_before_writes
    failures: list[str] = []

    # Every round that has rows to deliver compares them (the first one may take the rows
    # its event's apply read, without asking for the due rows).
    async def observe_before_writes(reads: Any, *args: Any, **kwargs: Any) -> Any:
        if any(row.peer == "b" for row, _ in reads) and not failures:
            failures.append("b")
            raise RuntimeError("a bug in a delivery round")
        return await real_compare(reads, *args, **kwargs)

    monkeypatch.setattr(ledger, "observe_before_writes", observe_before_writes)
    cluster.change(a, x, is_favorite=True)
    await cluster.service.wait_for(lambda: cluster.data(c, x) == UserData(favorite=True), 20)

    async def shown() -> bool:
        return "a bug in a delivery round" in str((await peer_status(cluster, "b"))["last_error"])

    await cluster.service.wait_for(shown, 20)
    assert "delivery round failed unexpectedly" in caplog.text
    # The pusher lives on: after its idle pause it delivers the row it could not.
    await clock.advance(1.0)
    await cluster.service.wait_for(lambda: cluster.data(b, x) == UserData(favorite=True), 20)
    assert (await peer_status(cluster, "b"))["depth"] == 0


async def test_a_peer_failing_every_write_is_tried_a_few_rows_at_a_time(
    make_cluster: MakeCluster,
) -> None:
    # b answers every write with 503 (it still answers the cheap probe). Each round tries as
    # many rows as there are write slots, gives up on the peer after their quick retries and
    # probes; it does not go on trying (and backing off on) every other row of the batch.
    concurrency = 4
    cluster = await make_cluster(2, pusher_options={"concurrency": concurrency})
    a, b = cluster.emus
    items = cluster.free_items[:40]
    b.fail_next_writes(1_000_000, 503)
    for item in items:
        cluster.change(a, item, is_favorite=True)

    pusher = cluster.service.links["b"].pusher
    # Three rounds' worth of failed rows (each after its quick retries).
    await cluster.service.wait_for(lambda: pusher.stats.failures >= 3 * concurrency, 20)
    tried = {w.item_id for w in b.writes}
    assert all(w.status == 503 for w in b.writes)
    assert len(tried) <= concurrency, sorted(tried)
    assert (await peer_status(cluster, "b"))["depth"] == len(items)

    b.fail_next_writes(0)
    await cluster.wait_items([b], items, UserData(favorite=True), timeout_s=20)
    assert (await peer_status(cluster, "b"))["depth"] == 0


async def test_a_failing_write_observer_does_not_stop_delivery(
    make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    x, y = cluster.free_items[:2]
    calls: list[str] = []

    def observer(peer: str, latency_s: float) -> None:
        calls.append(peer)
        if len(calls) == 1:
            raise RuntimeError("an observer bug")

    cluster.service.write_observers.append(observer)
    cluster.change(a, x, is_favorite=True)
    await cluster.service.wait_for(lambda: cluster.data(b, x) == UserData(favorite=True), 20)
    await cluster.service.wait_for(lambda: bool(calls), 20)
    cluster.change(a, y, rating=7.0)
    await cluster.service.wait_for(lambda: cluster.data(b, y) == UserData(rating=7.0), 20)
    await cluster.service.wait_for(lambda: len(calls) >= 2, 20)
    assert "reporting a recorded write failed" in caplog.text
    assert (await peer_status(cluster, "b"))["depth"] == 0
