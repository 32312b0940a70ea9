"""Many dead rows: /status, /metrics and ``jfsync status`` count them all and load a sample.

A peer can park thousands of writes (a library removed on one server); every status call used
to load every one. The count now comes from SQL and the list is the oldest
``DEAD_ROWS_IN_STATUS`` (made small here so a few rows exceed it).
"""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jfsync.ops import snapshot as snapshot_module
from jfsync.ops.statuscmd import find_problems
from tests.operate.conftest import Stack, StackFactory

pytestmark = pytest.mark.timeout(60)

PARKED = 5
SHOWN = 2


async def park(stack: Stack, count: int) -> list[str]:
    """Make cabin refuse ``count`` writes with 404; wait until all are parked."""
    items = stack.items[:count]
    stack.cabin.fail_next_writes(count, 404)
    for item in items:
        stack.change(stack.home, item, is_favorite=True)

    async def parked() -> bool:
        count_now, _ = await stack.service.ledger.dead_summary("cabin", 0)
        return count_now == count

    await stack.wait_for(parked)
    return items


async def test_status_counts_every_dead_row_and_lists_the_oldest(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot_module, "DEAD_ROWS_IN_STATUS", SHOWN)
    stack = await make_stack()
    items = await park(stack, PARKED)

    status, text = await stack.get("/status")
    assert status == 200
    cabin = next(s for s in json.loads(text)["servers"] if s["name"] == "cabin")
    assert cabin["outbox"]["dead_count"] == PARKED
    assert len(cabin["outbox"]["dead"]) == SHOWN
    assert {d["item"] for d in cabin["outbox"]["dead"]} <= set(items)

    status, text = await stack.get("/metrics")
    assert status == 200
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "jfsync_outbox_dead_rows"
    ]
    assert {s.labels["peer"]: s.value for s in family.samples}["cabin"] == PARKED

    # jfsync status says how many there are, not how many the sample holds.
    found = find_problems(json.loads((await stack.get("/status"))[1]))
    [line] = [p.text for p in found if "dead row" in p.text]
    assert f"peer cabin has {PARKED} dead row(s)" in line
