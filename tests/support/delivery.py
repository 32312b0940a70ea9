"""Delivery helpers for tests: a pusher watcher that sets an event after each recorded batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from jfsync.sync.delivery import Delivered, DeliveryWatcher


class SetOnWrite(DeliveryWatcher):
    """Sets ``event`` after every batch of writes the pusher recorded."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def written(self, peer: str, writes: Sequence[Delivered]) -> None:
        self._event.set()
