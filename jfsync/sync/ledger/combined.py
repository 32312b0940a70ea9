"""Ledger reads sized for the event loop: several answers in one hop, or one answer in pages.

Each hop to SQLite's thread queues behind whatever the ledger is doing (a catch-up's
transaction, a burst's apply), and every live event's apply queues behind the hops already
waiting. What a caller would otherwise ask in a row of separate calls is answered here by one
plain function on the sync connection, run by a thin :class:`~jfsync.sync.ledger.store.Ledger`
method: :func:`outbox_summaries` is the outbox part of the status snapshot (three reads per peer,
polled every few seconds by the status page and the benches). The other way round, what one
call would read or queue for a whole user (every last-known state of a user on a server, every
item a server has no history of) is cut here into keyed ranges of the user's item ids
(:func:`last_known_page`, :func:`unknown_page`), one short call each, so that a live event's
apply waits for one page of a catch-up, never for the whole user.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass

from jfsync.model import UserData
from jfsync.sync.ledger import outbox
from jfsync.sync.ledger.codec import STATE_COLS, Pair, decode_state, fetch
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


def last_known_page(
    db: sqlite3.Connection, sid: int, uid: int, after: int, limit: int
) -> tuple[dict[str, UserData], int | None]:
    """At most ``limit`` last-known states of user ``uid`` on server ``sid``, of the items whose
    id is above ``after``, by canonical item; and the cursor of the next page (None: none).

    One range of the ``last_known_by_server`` index (server, user, then item): the page costs
    the rows it returns, wherever it starts.
    """
    rows = fetch(
        db,
        f"SELECT k.item, i.key, {STATE_COLS} FROM last_known k "  # noqa: S608 - fixed columns
        "JOIN items i ON i.id = k.item "
        "WHERE k.server=? AND k.user=? AND k.item>? ORDER BY k.item LIMIT ?",
        (sid, uid, after, limit),
    )
    states = {str(r[1]): decode_state(r, 2) for r in rows}
    return states, (int(rows[-1][0]) if len(rows) == limit else None)


def unknown_page(
    db: sqlite3.Connection, sid: int, uid: int, after: int, span: int, *, only_mapped: bool
) -> tuple[set[Pair], int | None]:
    """Pairs of user ``uid`` with a canonical state but no last-known state on ``sid`` (with
    ``only_mapped``, only items ``sid`` maps), among the next ``span`` canonical items of the
    user after item id ``after``; and the cursor of the next range (None: this was the last).

    The range is bounded by the canonical rows it covers, not by the pairs found, so a page
    costs about the same whether it finds nothing or everything.
    """
    bound = fetch(
        db,
        "SELECT item FROM canonical WHERE user=? AND item>? ORDER BY item LIMIT 1 OFFSET ?",
        (uid, after, span - 1),
    )
    last = int(bound[0][0]) if bound else None
    mapped = (
        "AND EXISTS (SELECT 1 FROM server_items s WHERE s.server=? AND s.item=c.item) "
        if only_mapped
        else ""
    )
    upper = "" if last is None else "AND c.item<=? "
    parameters: list[int] = [uid, after]
    if last is not None:
        parameters.append(last)
    if only_mapped:
        parameters.append(sid)
    parameters.append(sid)
    rows = fetch(
        db,
        f"SELECT c.item FROM canonical c WHERE c.user=? AND c.item>? {upper}{mapped}"  # noqa: S608
        "AND NOT EXISTS (SELECT 1 FROM last_known k WHERE k.user=c.user "
        "AND k.item=c.item AND k.server=?)",
        parameters,
    )
    return {(uid, int(r[0])) for r in rows}, last
