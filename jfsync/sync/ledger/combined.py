"""Reads that answer several questions in one call on the ledger's thread (one hop, not many).

Each hop to SQLite's thread queues behind whatever the ledger is doing (a catch-up's
transaction, a burst's apply), and every live event's apply queues behind the hops already
waiting. What a caller would otherwise ask in a row of separate calls is answered here by one
plain function on the sync connection, run by a thin :class:`~jfsync.sync.ledger.store.Ledger`
method: :func:`outbox_summaries` is the outbox part of the status snapshot (three reads per peer,
polled every few seconds by the status page and the benches).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass

from jfsync.sync.ledger import outbox
from jfsync.sync.ledger.outbox import OutboxRow


@dataclass(frozen=True, slots=True)
class PeerOutbox:
    """What the status shows of one peer's outbox."""

    #: Live rows queued.
    depth: int
    #: When the oldest live row was created (wall ms; None: no live row).
    oldest_created_ms: int | None
    #: Rows parked as dead.
    dead_count: int
    #: The oldest dead rows (at most the limit asked for), with their reasons.
    dead: list[OutboxRow]

    def oldest_age_s(self, now_ms: int) -> float | None:
        """Age in seconds of the oldest live row at ``now_ms`` (None when there is none)."""
        oldest = self.oldest_created_ms
        return None if oldest is None else max(0.0, (now_ms - oldest) / 1000.0)


def outbox_summaries(
    db: sqlite3.Connection, names: Mapping[int, str], sids: Mapping[str, int], dead_limit: int
) -> dict[str, PeerOutbox]:
    """Each peer's (name -> server id in ``sids``) outbox depth, oldest live row, dead count and
    oldest ``dead_limit`` dead rows."""
    return {
        peer: PeerOutbox(
            depth=outbox.depth(db, sid),
            oldest_created_ms=outbox.oldest_created_ms(db, sid),
            dead_count=outbox.dead_count(db, sid),
            dead=outbox.dead(db, names, sid, dead_limit),
        )
        for peer, sid in sids.items()
    }
