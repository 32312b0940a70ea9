"""The activity feed: what a user changed shows in /status and ``jfsync status --activity``."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jfsync.model import Register
from jfsync.ops import statuscmd
from jfsync.ops.activity import ActivityEntry, ActivityFeed
from jfsync.sync import delivery
from tests.operate.conftest import Stack, StackFactory

pytestmark = pytest.mark.timeout(30)


async def _activity(stack: Stack) -> list[dict[str, Any]]:
    status, text = await stack.get("/status")
    assert status == 200, text
    entries = json.loads(text)["activity"]
    assert isinstance(entries, list)
    return entries


async def test_a_change_shows_who_what_where_and_how_long(make_stack: StackFactory) -> None:
    stack = await make_stack()
    item = stack.items[0]
    await stack.flow(stack.home, item, is_favorite=True)

    async def written() -> bool:
        entries = await _activity(stack)
        return bool(entries) and entries[0]["to"][0]["state"] == "written"

    await stack.wait_for(written)
    entry = (await _activity(stack))[0]
    library_item = stack.home.item(item)
    assert entry["user_name"] == "alice"
    assert entry["from"] == "home"
    assert entry["kind"] == "event"
    assert entry["registers"] == ["favorite"]
    assert entry["name"] is not None
    assert entry["name"].startswith(library_item.name)
    (delivery,) = entry["to"]
    assert delivery["server"] == "cabin"
    assert delivery["registers"] == ["favorite"]
    assert delivery["latency_s"] is not None
    assert delivery["latency_s"] >= 0
    assert delivery["done_ms"] >= entry["at_ms"]

    # The other way round, and a second register: the newest change comes first.
    await stack.flow(stack.cabin, stack.items[1], played=True)
    await stack.wait_for(written)
    newest, older = (await _activity(stack))[:2]
    assert (newest["from"], newest["to"][0]["server"]) == ("cabin", "home")
    assert "play_state" in newest["registers"]
    assert newest["seq"] > older["seq"]


async def test_jfsync_status_activity_prints_the_feed(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.flow(stack.home, stack.items[2], rating=8.0)
    name = stack.home.item(stack.items[2]).name

    async def named() -> bool:
        entries = await _activity(stack)
        return bool(entries) and entries[0]["to"][0]["state"] == "written"

    await stack.wait_for(named)
    out = io.StringIO()
    code = await asyncio.to_thread(
        statuscmd.show_status, stack.url, None, timeout_s=5, activity=True, out=out
    )
    text = out.getvalue()
    assert code == 0, text
    assert text.startswith("ACTIVITY")
    line = next(line for line in text.splitlines() if name in line)
    assert "alice" in line
    assert "home → cabin" in line
    assert "rating" in line
    assert re.search(r"cabin (\d+ ms|\d+s)$", line), line

    raw = io.StringIO()
    await asyncio.to_thread(
        statuscmd.show_status, stack.url, None, timeout_s=5, activity=True, raw=True, out=raw
    )
    assert json.loads(raw.getvalue())[0]["registers"] == ["rating"]


async def test_a_fresh_service_says_nothing_happened_yet(make_stack: StackFactory) -> None:
    stack = await make_stack()
    out = io.StringIO()
    code = await asyncio.to_thread(
        statuscmd.show_status, stack.url, None, timeout_s=5, activity=True, out=out
    )
    assert code == 0
    assert "No activity yet" in out.getvalue()


def _changed(feed: ActivityFeed, n: int, registers: Any) -> ActivityEntry:
    """Item ``i<n>`` of user u changed on home at ``n`` ms, owed to cabin."""
    return feed.record_change(
        at_ms=n,
        server="home",
        user="u",
        item=f"i{n}",
        kind="event",
        registers=registers,
        owed={"cabin": registers},
    )


def test_the_feed_keeps_only_its_capacity_and_matches_writes_to_changes() -> None:
    feed = ActivityFeed(capacity=3)
    for n in range(5):
        _changed(feed, n, ["favorite"])
    assert [e.item for e in feed.entries()] == ["i4", "i3", "i2"]
    # A write of an entry that fell out of the ring still shows, with an unknown source.
    lost = feed.record_write(
        peer="cabin", user="u", item="i0", registers=["favorite"], done_ms=9, latency_s=0.5
    )
    assert lost.source is None
    assert lost.to[0].state == "written"
    kept = feed.record_write(
        peer="cabin", user="u", item="i4", registers=["favorite"], done_ms=10, latency_s=0.25
    )
    assert kept.item == "i4"
    assert kept.source == "home"
    assert kept.to[0].latency_s == 0.25
    # A newer change of a queued item supersedes the older entry's delivery.
    first = feed.record_change(
        at_ms=20,
        server="home",
        user="u",
        item="x",
        kind="event",
        registers=["rating"],
        owed={"cabin": ["rating"]},
    )
    second = feed.record_change(
        at_ms=21,
        server="home",
        user="u",
        item="x",
        kind="event",
        registers=["rating"],
        owed={"cabin": ["rating"]},
    )
    feed.record_write(
        peer="cabin", user="u", item="x", registers=["rating"], done_ms=22, latency_s=0.1
    )
    assert first.to[0].state == "superseded"
    assert second.to[0].state == "written"
    assert len(feed) == 3


async def test_each_poll_shows_every_entry_as_it_is_then(make_stack: StackFactory) -> None:
    """The status server encodes an entry once while it stays the same: a delivery that
    moves on (queued, dead, written again after a retry) shows its new state in the very
    next poll, and the body is the plain JSON of the snapshot."""
    stack = await make_stack()
    good, refused = stack.items[0], stack.items[1]
    await stack.flow(stack.home, good, is_favorite=True)
    stack.cabin.fail_next_writes(1, 404)
    stack.change(stack.home, refused, is_favorite=True)

    async def state_of(item: str) -> str | None:
        status, text = await stack.get("/status")
        assert status == 200, text
        assert json.dumps(json.loads(text)) + "\n" == text
        entry = next((e for e in json.loads(text)["activity"] if e["item"] == item), None)
        return None if entry is None else str(entry["to"][0]["state"])

    async def shows(item: str, state: str) -> bool:
        return await state_of(item) == state

    await stack.wait_for(lambda: shows(refused, "dead"))
    assert await state_of(good) == "written"
    status, _ = await stack.get("/retry-dead", method="POST")
    assert status == 200
    await stack.wait_for(lambda: shows(refused, "written"))
    assert stack.user_data(stack.cabin, refused).favorite


def test_registers_show_sorted_by_name_however_the_change_gave_them() -> None:
    """The ledger hands a change's registers over as a set (the same set object for many
    changes of a bulk action); the feed shows them sorted, the same for every entry."""
    feed = ActivityFeed(capacity=10)
    both = frozenset({Register.PLAY_STATE, Register.FAVORITE})
    entries = [
        _changed(feed, n, registers)
        for n, registers in enumerate(
            [both, both, [Register.PLAY_STATE, Register.FAVORITE], frozenset({Register.RATING})]
        )
    ]
    assert [e.registers for e in entries] == [
        ("favorite", "play_state"),
        ("favorite", "play_state"),
        ("favorite", "play_state"),
        ("rating",),
    ]
    assert [e.to[0].registers for e in entries] == [e.registers for e in entries]
    written = feed.record_write(
        peer="cabin", user="u", item="new", registers=both, done_ms=9, latency_s=0.1
    )
    assert written.registers == ("favorite", "play_state")


async def test_every_write_of_a_bulk_action_is_shown_and_counted(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's writes are told to the feed and the metrics a slice at a time (the event loop
    given back between): a user who favourites many items at once still sees every one of
    them written to the other server, and /metrics counts each write."""
    monkeypatch.setattr(delivery, "REPORT_STEP", 3)
    stack = await make_stack()
    items = stack.items[:11]
    expected = {item: stack.change(stack.home, item, is_favorite=True) for item in items}
    await stack.wait_for(lambda: all(stack.user_data(stack.cabin, i) == expected[i] for i in items))

    async def all_written() -> bool:
        entries = await _activity(stack)
        written = {
            e["item"]
            for e in entries
            if e["from"] == "home" and [d["state"] for d in e["to"]] == ["written"]
        }
        return written >= set(items)

    await stack.wait_for(all_written)
    status, text = await stack.get("/metrics")
    assert status == 200, text
    counted = {
        sample.labels["peer"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "jfsync_propagation_latency_seconds_count"
    }
    assert counted.get("cabin") == len(items)
