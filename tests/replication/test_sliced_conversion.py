"""A bulk message is handed to the intake before it is converted; the user still wins.

The subscriber converts only the first :data:`~jfsync.sync.subscriber.ENTRIES_PER_STEP`
entries of a ``UserDataChanged`` and hands the event on; the intake converts and maps the
rest a step at a time once the first slice is applied, so the first writes of a bulk action do
not wait for all of it to be converted. Here a step is seven entries, so the bulk actions of
``test_sliced_apply`` (300 items) arrive almost all unconverted, and every test of that module
runs again on this path: a later change made elsewhere, arriving as an event or found by a
catch-up while the rest is converted, neither waits for it nor is overwritten by it.
"""

from __future__ import annotations

import pytest

from jfsync.sync import subscriber as subscriber_module
from tests.replication.test_sliced_apply import *  # noqa: F403 - the same tests, run again

STEP = 7


@pytest.fixture(autouse=True)
def tiny_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subscriber_module, "ENTRIES_PER_STEP", STEP)
