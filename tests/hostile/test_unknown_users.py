"""Events of a user jfsync does not sync are said, not dropped silently, and not line by line."""

from __future__ import annotations

import logging

import pytest

from jfsync.model import UserData
from jfsync.sync.subscriber import UserDataChangedEvent, UserDataEntry
from tests.operate.conftest import StackFactory

pytestmark = pytest.mark.timeout(60)

STRANGER = "0123456789abcdef0123456789abcdef"


async def test_a_stream_of_events_for_an_unsynced_user_is_a_few_lines(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jfsync.sync.intake")
    stack = await make_stack()
    item = stack.items[0]
    event = UserDataChangedEvent("home", STRANGER, (UserDataEntry(item, UserData(favorite=True)),))
    for _ in range(200):  # e.g. a subscriber whose user was unmatched since
        await stack.service._on_event(event)
    lines = [r.getMessage() for r in caplog.records if r.name == "jfsync.sync.intake"]
    assert len(lines) == 4, lines
    assert f"[home] ignored an event of user {STRANGER}, who is not synced" in lines[0]
    assert "[home] events of users not synced: more are counted" in lines[3]
    assert stack.service.counters.events_received == 200
    # Nothing was applied for the stranger.
    assert stack.user_data(stack.cabin, item) == UserData()
