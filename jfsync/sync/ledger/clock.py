"""The ledger's sense of time: the persisted hybrid clock and the read tickets.

The hybrid clock stamps every change (and numbers outbox row versions): never behind the wall
clock, always ahead of the last stamp, saved in ``meta.clock_ms`` by the transaction that moved
it. Tickets order what this process learnt of each (user, item, server): an event applied, a
read requested, a write acked. A read whose ticket is older than the last thing learnt of its key
is outdated and never applied. Tickets live in memory only: after a restart every read is newer.
Tickets are handed out both on the event loop (before a read is requested) and on the ledger's
SQLite thread (inside a transaction), from one counter that is safe to share between threads.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterable, Mapping

from jfsync.sync.ledger.codec import Key, fetch
from jfsync.sync.merge import next_stamp_ms

#: Keys whose last-seen ticket is kept before old ones are dropped, and how many tickets back
#: they are kept then: a read that waited through that many newer events and writes is taken
#: as fresh for the keys dropped (as before read tickets existed).
SEEN_KEYS_MAX = 100_000
SEEN_KEEP_TICKETS = 100_000


class Clock:
    """The hybrid clock (:attr:`ms`), the ticket counter and the last ticket seen per key."""

    def __init__(self) -> None:
        #: The latest stamp handed out.
        self.ms = 0
        self._tickets = itertools.count(1)
        #: :meth:`ticket` without the method call (a bulk apply takes one per observation).
        self.next_ticket = self._tickets.__next__
        #: When the ledger last learnt anything of each (user, item, server), as a ticket.
        self._seen: dict[Key, int] = {}
        #: At least every ticket in the seen map: a ticket above it is newer than all of them
        #: (a bulk apply then skips the per-key look-ups).
        self.seen_high = 0

    def load(self, db: sqlite3.Connection) -> None:
        """Read the persisted clock."""
        rows = list(fetch(db, "SELECT value FROM meta WHERE key='clock_ms'"))
        self.ms = int(rows[0][0])

    def save(self, db: sqlite3.Connection) -> None:
        """Persist the clock in the caller's transaction."""
        db.execute("UPDATE meta SET value=? WHERE key='clock_ms'", (self.ms,))

    def tick(self, wall_ms: int) -> int:
        """Advance the hybrid clock past ``wall_ms`` and the last stamp; return the new stamp."""
        self.ms = next_stamp_ms(wall_ms, self.ms)
        return self.ms

    def ticket(self) -> int:
        """A number larger than every one handed out before, from any thread: ``next`` of an
        :class:`itertools.count` is one call into C, which no other thread interrupts."""
        return next(self._tickets)

    def seen(self, key: Key) -> int:
        """The ticket of the last thing learnt of ``key`` (0: nothing in this process)."""
        return self._seen.get(key, 0)

    def newer_than_seen(self, keys: Iterable[Key], seq: int) -> list[Key]:
        """The keys of ``keys`` last seen before ticket ``seq`` (or never)."""
        get = self._seen.get
        return [key for key in keys if seq > get(key, 0)]

    def note_seen(self, seen: Mapping[Key, int]) -> None:
        """Keep what a transaction learnt of when each key was last seen; stay bounded."""
        known = self._seen
        high = self.seen_high
        if seen and min(seen.values()) > high:
            # All newer than anything kept (a burst's events): no key needs comparing.
            known.update(seen)
            high = max(seen.values())
        else:
            for key, seq in seen.items():
                if seq > known.get(key, 0):
                    known[key] = seq
                    if seq > high:
                        high = seq
        self.seen_high = high
        if len(known) > SEEN_KEYS_MAX:
            horizon = self.ticket() - SEEN_KEEP_TICKETS
            self._seen = {k: v for k, v in known.items() if v >= horizon}
