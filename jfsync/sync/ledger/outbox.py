"""The outbox: what each peer is still owed, as rows, and the queries a pusher's queue runs.

At most one row per (peer, user, item) names the registers owed and the desired state.
:class:`OutboxRow` is a row as callers see it (canonical keys, the peer's own ids);
:class:`WorkRow` is a row while a transaction works on it (ids only, replaced, never changed in
place). The read queries (due rows, dead rows, depth, age) live here; rows are written only by
:class:`jfsync.sync.ledger.writer.StateWriter`, which keeps the state cache right, in the columns
of :data:`ROW_COLS`.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from jfsync.model import Register, UserData, user_data_of
from jfsync.sync.ledger.codec import (
    CHUNK,
    MASKS,
    STATE_COLS,
    Key,
    chunks,
    decode_state,
    fetch,
    marks,
    mask_registers,
)

#: An outbox row with its canonical keys and the peer's own ids, in one indexed read.
ROW_SELECT = (
    "SELECT o.id, o.peer, u.key, i.key, o.registers, o.favorite, o.rating, o.played, "
    "o.play_count, o.last_played_s, o.position_ticks, o.version, o.created_ms, o.attempts, "
    "o.next_attempt_ms, o.last_error, o.dead, su.remote_id, si.remote_id, o.user, o.item "
    "FROM outbox o JOIN users u ON u.id = o.user JOIN items i ON i.id = o.item "
    "LEFT JOIN server_users su ON su.server = o.peer AND su.user = o.user "
    "LEFT JOIN server_items si ON si.server = o.peer AND si.item = o.item "
)
#: Rows of a (peer, user) the reset guard holds wait: nothing is written there until resolved.
NOT_HELD = (
    "AND NOT EXISTS (SELECT 1 FROM reset_holds h WHERE h.server = o.peer AND h.user = o.user) "
)
#: Rows by ids, as a transaction loads them (:func:`decode_work_row`).
WORK_SELECT = (
    "SELECT o.user, o.item, o.peer, o.id, o.registers, o.favorite, o.rating, o.played, "
    "o.play_count, o.last_played_s, o.position_ticks, o.version, o.created_ms, o.attempts, "
    "o.next_attempt_ms, o.last_error, o.dead FROM outbox o"
)
#: The columns of a row's values, in the order :class:`WorkRow` holds them (after its id).
ROW_COLS = (
    f"registers, {STATE_COLS}, version, created_ms, attempts, next_attempt_ms, last_error, dead"
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending write: the registers owed to ``peer`` for ``user`` and ``item``."""

    id: int
    peer: str
    user: str
    item: str
    registers: frozenset[Register]
    desired: UserData
    version: int
    created_ms: int
    attempts: int
    next_attempt_ms: int
    last_error: str | None
    dead: bool
    #: The peer's own ids when the id maps know them (else use the canonical keys).
    remote_user_id: str | None = None
    remote_item_id: str | None = None

    def intended(self, current: UserData) -> UserData:
        """Return ``current`` with this row's registers set to their desired values."""
        result = current
        for register in self.registers:
            result = result.with_register(register, self.desired.get(register))
        return result


class WorkRow(NamedTuple):
    """An outbox row while a transaction works on it (replaced, never changed in place).

    ``id`` is None until the transaction numbers it; ``mask`` is the registers owed. A named
    tuple, not a frozen dataclass: a bulk apply builds one per row, and a tuple is built about
    seven times faster (it is never compared with other tuples, and never leaves the package).
    """

    id: int | None
    mask: frozenset[Register]
    desired: UserData
    version: int
    created_ms: int
    attempts: int = 0
    next_attempt_ms: int = 0
    last_error: str | None = None
    dead: bool = False

    def numbered(self, row_id: int) -> WorkRow:
        """This row with the id SQLite will store it under."""
        return tuple.__new__(WorkRow, (row_id, *self[1:]))

    def owing(self, mask: frozenset[Register], desired: UserData, version: int) -> WorkRow:
        """This row owing ``mask`` of ``desired`` as of ``version`` (the rest kept)."""
        return tuple.__new__(WorkRow, (self[0], mask, desired, version, *self[4:]))

    def as_outbox_row(self, like: OutboxRow) -> OutboxRow:
        """This row named like ``like`` (same peer, keys and remote ids); it must be numbered."""
        row_id, mask, desired, version, created_ms, attempts, next_ms, error, dead = self
        assert row_id is not None  # numbered before it is handed out
        return _outbox_row(
            row_id,
            like.peer,
            like.user,
            like.item,
            mask,
            desired,
            version,
            created_ms,
            attempts,
            next_ms,
            error,
            dead,
            like.remote_user_id,
            like.remote_item_id,
        )


_new_object = object.__new__
_MASKS = MASKS
(
    _set_id,
    _set_peer,
    _set_user,
    _set_item,
    _set_registers,
    _set_desired,
    _set_version,
    _set_created_ms,
    _set_attempts,
    _set_next_attempt_ms,
    _set_last_error,
    _set_dead,
    _set_remote_user_id,
    _set_remote_item_id,
) = (OutboxRow.__dict__[name].__set__ for name in OutboxRow.__dataclass_fields__)


def _outbox_row(
    row_id: int,
    peer: str,
    user: str,
    item: str,
    registers: frozenset[Register],
    desired: UserData,
    version: int,
    created_ms: int,
    attempts: int,
    next_attempt_ms: int,
    last_error: str | None,
    dead: bool,
    remote_user_id: str | None,
    remote_item_id: str | None,
) -> OutboxRow:
    """An :class:`OutboxRow` of all its fields, in their order, set through its slots: a
    pusher round reads hundreds of rows and hands each back once more after its compare, and
    the frozen dataclass's ``__init__`` costs two and a half times as much (on SQLite's
    thread, where Python holds the GIL against the event loop). Whole before anyone sees it.
    """
    row = _new_object(OutboxRow)
    _set_id(row, row_id)
    _set_peer(row, peer)
    _set_user(row, user)
    _set_item(row, item)
    _set_registers(row, registers)
    _set_desired(row, desired)
    _set_version(row, version)
    _set_created_ms(row, created_ms)
    _set_attempts(row, attempts)
    _set_next_attempt_ms(row, next_attempt_ms)
    _set_last_error(row, last_error)
    _set_dead(row, dead)
    _set_remote_user_id(row, remote_user_id)
    _set_remote_item_id(row, remote_item_id)
    return row


def decode_row(r: Sequence[Any], names: Mapping[int, str]) -> OutboxRow:
    """An :class:`OutboxRow` from a :data:`ROW_SELECT` row; ``names`` are the servers by id.

    The values are taken as SQLite gives them: the schema's INTEGER columns hold only ints and
    its TEXT columns only text (a pusher round decodes hundreds of rows, on SQLite's thread).
    """
    return _outbox_row(
        r[0],
        names[r[1]],
        r[2],
        r[3],
        _MASKS[r[4] & 7],
        user_data_of(tuple(r[5:11])),
        r[11],
        r[12],
        r[13],
        r[14],
        r[15],
        bool(r[16]),
        r[17],
        r[18],
    )


def decode_work_row(row: Sequence[Any]) -> tuple[Key, WorkRow]:
    """The key and :class:`WorkRow` of a :data:`WORK_SELECT` row."""
    key = (int(row[0]), int(row[1]), int(row[2]))
    return key, WorkRow(
        id=int(row[3]),
        mask=mask_registers(int(row[4])),
        desired=decode_state(row, 5),
        version=int(row[11]),
        created_ms=int(row[12]),
        attempts=int(row[13]),
        next_attempt_ms=int(row[14]),
        last_error=None if row[15] is None else str(row[15]),
        dead=bool(row[16]),
    )


def due(
    db: sqlite3.Connection,
    names: Mapping[int, str],
    sid: int,
    limit: int,
    now_ms: int,
    exclude: Iterable[int],
) -> list[OutboxRow]:
    """Up to ``limit`` live rows of peer ``sid`` due at ``now_ms``, oldest due first.

    Rows of held (server, user) pairs wait. ``exclude`` holds row ids to skip: SQLite skips up
    to a chunk of them (so they cost no reading), any more are skipped here.
    """
    ids = sorted(set(exclude))
    in_sql, beyond = ids[:CHUNK], set(ids[CHUNK:])
    skip = f"AND o.id NOT IN ({marks(len(in_sql))}) " if in_sql else ""
    rows = fetch(
        db,
        ROW_SELECT
        + "WHERE o.peer=? AND o.dead=0 AND o.next_attempt_ms<=? "
        + NOT_HELD
        + skip
        + "ORDER BY o.next_attempt_ms, o.created_ms, o.id LIMIT ?",
        (sid, now_ms, *in_sql, limit + len(beyond)),
    )
    kept = [r for r in rows if int(r[0]) not in beyond] if beyond else list(rows)
    return [decode_row(r, names) for r in kept[:limit]]


def rows_at(
    db: sqlite3.Connection, names: Mapping[int, str], keys: Iterable[Key]
) -> dict[Key, OutboxRow]:
    """The rows, live or dead, of the given (user, item, peer) keys that exist."""
    grouped: dict[tuple[int, int], list[int]] = defaultdict(list)
    for uid, iid, sid in set(keys):
        grouped[(sid, uid)].append(iid)
    found: dict[Key, OutboxRow] = {}
    for (sid, uid), items in grouped.items():
        for chunk in chunks(sorted(items), CHUNK):
            rows = fetch(
                db,
                ROW_SELECT + f"WHERE o.peer=? AND o.user=? AND o.item IN ({marks(len(chunk))})",
                (sid, uid, *chunk),
            )
            for r in rows:
                found[(int(r[19]), int(r[20]), int(r[1]))] = decode_row(r, names)
    return found


def depth(db: sqlite3.Connection, sid: int) -> int:
    """How many live rows peer ``sid`` has queued."""
    rows = fetch(db, "SELECT COUNT(*) FROM outbox WHERE peer=? AND dead=0", (sid,))
    return int(next(iter(rows))[0])


def oldest_created_ms(db: sqlite3.Connection, sid: int) -> int | None:
    """When the oldest live row of peer ``sid`` was created (None: no live row)."""
    rows = fetch(db, "SELECT MIN(created_ms) FROM outbox WHERE peer=? AND dead=0", (sid,))
    oldest = next(iter(rows))[0]
    return None if oldest is None else int(oldest)


def dead_count(db: sqlite3.Connection, sid: int) -> int:
    """How many rows of peer ``sid`` are parked."""
    rows = fetch(db, "SELECT COUNT(*) FROM outbox WHERE peer=? AND dead=1", (sid,))
    return int(next(iter(rows))[0])


def dead(
    db: sqlite3.Connection, names: Mapping[int, str], sid: int, limit: int | None = None
) -> list[OutboxRow]:
    """The parked rows of peer ``sid``, oldest first (at most ``limit`` of them)."""
    select = ROW_SELECT + "WHERE o.peer=? AND o.dead=1 ORDER BY o.created_ms, o.id"
    if limit is None:
        rows = fetch(db, select, (sid,))
    else:
        rows = fetch(db, select + " LIMIT ?", (sid, limit))
    return [decode_row(r, names) for r in rows]


def registers_owed(db: sqlite3.Connection) -> list[tuple[int, Key, int]]:
    """Every row, live or dead: its id, its (user, item, peer) and its register bits."""
    rows = fetch(db, "SELECT id, user, item, peer, registers FROM outbox")
    return [(int(r[0]), (int(r[1]), int(r[2]), int(r[3])), int(r[4])) for r in rows]


def unmapped(db: sqlite3.Connection, sid: int) -> list[tuple[int, Key]]:
    """The rows of peer ``sid`` for items it does not map: id and (user, item, peer) each."""
    rows = fetch(
        db,
        "SELECT o.id, o.user, o.item FROM outbox o WHERE o.peer=? AND NOT EXISTS "
        "(SELECT 1 FROM server_items s WHERE s.server=o.peer AND s.item=o.item)",
        (sid,),
    )
    return [(int(r[0]), (int(r[1]), int(r[2]), sid)) for r in rows]
