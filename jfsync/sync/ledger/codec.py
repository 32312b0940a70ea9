"""How ledger rows encode states, stamps, echo lists and register sets, and the SQL helpers.

Every module of the ledger reads and writes the same column layouts: a :class:`UserData` is six
columns (:data:`STATE_COLS`), a canonical state adds three stamped registers
(:data:`CANON_COLS`), pending echoes are one JSON text per key, a register set is a bit mask.
The decoders intern what they build (states and register sets repeat a lot), so decoding a
burst costs little memory. The key types (:data:`Key`, :data:`Pair`), the chunking helpers
for ``IN (...)`` lists and the multi-row INSERT of many rows (:func:`insert_flat`) live here
too, so that no module of the package imports another for them.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from jfsync.model import ALL_REGISTERS, Register, Stamp, UserData, user_data_of
from jfsync.sync.echo import PendingWrite
from jfsync.sync.merge import CanonicalState, Stamped

#: (user, item, server) ids.
Key = tuple[int, int, int]
#: (user, item) ids.
Pair = tuple[int, int]

#: Placeholders per IN (...) list; far below SQLite's variable limit, large enough to batch.
CHUNK = 500

#: Rows per multi-row INSERT (:func:`insert_flat`): 50 rows of the widest table (17 columns)
#: are 850 placeholders, far below SQLite's limit of 32,766.
ROWS_PER_INSERT = 50

STATE_COLS = "favorite, rating, played, play_count, last_played_s, position_ticks"
CANON_COLS = (
    f"user, item, {STATE_COLS}, favorite_ms, favorite_tiebreak, favorite_origin, "
    "rating_ms, rating_tiebreak, rating_origin, "
    "play_state_ms, play_state_tiebreak, play_state_origin"
)

_BITS: dict[Register, int] = {Register.FAVORITE: 1, Register.RATING: 2, Register.PLAY_STATE: 4}
_ALL_BITS = sum(_BITS.values())
#: Every register set, by its bits (decoded once, shared by every row).
MASKS: tuple[frozenset[Register], ...] = tuple(
    frozenset(r for r, b in _BITS.items() if bits & b) for bits in range(_ALL_BITS + 1)
)
_MASKS = MASKS
#: The bits of every register set (any frozenset of registers is one of :data:`MASKS`).
MASK_BITS: dict[frozenset[Register], int] = {mask: bits for bits, mask in enumerate(_MASKS)}
_MASK_BITS = MASK_BITS


def upsert_sql(table: str, columns: str, key: str) -> str:
    """An INSERT of ``columns`` that updates the row in place when ``key`` exists.

    Unlike INSERT OR REPLACE (delete, then insert), this leaves secondary indexes alone when
    their columns do not change: about a third less SQLite work per row on the hot paths.
    """
    keys = set(key.split(", "))
    values = [c for c in columns.split(", ") if c not in keys]
    assignments = ", ".join(f"{c}=excluded.{c}" for c in values)
    marks_ = ", ".join("?" * len(columns.split(", ")))
    return (
        f"INSERT INTO {table}({columns}) VALUES ({marks_}) "  # noqa: S608 - fixed names
        f"ON CONFLICT({key}) DO UPDATE SET {assignments}"
    )


def state_values(data: UserData) -> tuple[Any, ...]:
    """The :data:`STATE_COLS` values of ``data``."""
    ps = data.play_state
    return (
        int(data.favorite),
        data.rating,
        int(ps.played),
        ps.play_count,
        ps.last_played_s,
        ps.position_ticks,
    )


def decode_state(row: Sequence[Any], offset: int) -> UserData:
    """The state held in ``row``'s :data:`STATE_COLS` starting at ``offset``."""
    # Interned: rows repeat a few states (a season marked played, the defaults).
    return user_data_of(tuple(row[offset : offset + 6]))


def decode_canonical(row: Sequence[Any]) -> CanonicalState:
    """The canonical state in a row of :data:`CANON_COLS` (user and item first)."""
    data = decode_state(row, 2)

    def stamped(offset: int) -> Stamped:
        return Stamped(Stamp(int(row[offset]), int(row[offset + 1])), str(row[offset + 2]))

    return CanonicalState(data, stamped(8), stamped(11), stamped(14))


def encode_echo(entries: Sequence[PendingWrite]) -> str:
    """The JSON of ``[[written_ms, state, replaced], ...]`` stored for pending echoes."""
    # States are interned and few, so each one's text is made once (two encodes per write
    # otherwise: intent and ack).
    return (
        "["
        + ",".join(
            f"[{e.written_ms},{_state_json(e.state)},"
            f"{'null' if e.replaced is None else _state_json(e.replaced)}]"
            for e in entries
        )
        + "]"
    )


#: The JSON of recently encoded states by object identity (each with its state, which keeps
#: the id from being reused): most states here are shared (interned), and looking one up by
#: value hashes the whole dataclass, twice per pending entry. Bounded: emptied when full.
_JSON_BY_ID: dict[int, tuple[UserData, str]] = {}
_JSON_BY_ID_MAX = 4096


def _state_json(state: UserData) -> str:
    hit = _JSON_BY_ID.get(id(state))
    if hit is not None and hit[0] is state:
        return hit[1]
    text = _state_json_by_value(state)
    if len(_JSON_BY_ID) >= _JSON_BY_ID_MAX:
        _JSON_BY_ID.clear()
    _JSON_BY_ID[id(state)] = (state, text)
    return text


@functools.lru_cache(maxsize=4096)
def _state_json_by_value(state: UserData) -> str:
    return json.dumps(state_values(state), separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def decode_echo(text: str) -> tuple[PendingWrite, ...]:
    """The pending echoes stored as ``text`` (:func:`encode_echo`); shared (immutable): keys
    written together hold one text, and so one list, whose later prunes and encodes are made
    once (by identity)."""
    return tuple(
        PendingWrite(
            decode_state(e[1], 0), int(e[0]), None if e[2] is None else decode_state(e[2], 0)
        )
        for e in json.loads(text)
    )


def mask_bits(registers: Iterable[Register]) -> int:
    """The bit mask stored for a register set."""
    if type(registers) is frozenset:
        known = _MASK_BITS.get(registers)
        if known is not None:
            return known
    bits = 0
    for register in registers:
        bits |= _BITS[register]
    return bits


def mask_registers(bits: int) -> frozenset[Register]:
    """The register set of a stored bit mask (shared: never build one per row)."""
    return _MASKS[bits & _ALL_BITS]


def ordered(registers: Iterable[Register]) -> list[Register]:
    """``registers`` in their fixed order (for stable messages)."""
    wanted = set(registers)
    return [r for r in ALL_REGISTERS if r in wanted]


def marks(count: int) -> str:
    """``count`` comma-separated SQL placeholders."""
    return ", ".join("?" * count)


def chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``values`` in slices of at most ``size``."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def fetch(db: sqlite3.Connection, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
    """Every row ``sql`` gives on ``db`` (call it on the connection's own thread)."""
    return db.execute(sql, parameters).fetchall()


def insert_flat(db: sqlite3.Connection, sql: str, flat: list[Any], width: int) -> None:
    """Run the one-row INSERT ``sql`` (``... VALUES (?, ...)``, an upsert clause allowed after
    it) for every row given one after the other in ``flat``, ``width`` values each, in order,
    as multi-row INSERTs of :data:`ROWS_PER_INSERT`.

    Same rows, in the same order, as ``db.executemany(sql, rows)``, with a third less of
    SQLite's work per row in a bulk apply: one statement step per 50 rows instead of one per
    row. The bulk writers build their parameters this way: a tuple per row, kept until the
    INSERT ran, was 30,000 objects for the cyclic garbage collector to walk in a 10k apply (it
    ran several times within it).
    """
    count = len(flat) // width
    whole = count - count % ROWS_PER_INSERT
    if whole:
        size = width * ROWS_PER_INSERT
        db.executemany(
            _multi_row(sql), [flat[start : start + size] for start in range(0, whole * width, size)]
        )
    if whole < count:
        db.executemany(
            sql, [flat[start : start + width] for start in range(whole * width, len(flat), width)]
        )


@functools.lru_cache(maxsize=64)
def _multi_row(sql: str) -> str:
    """``sql`` (one row of values) with :data:`ROWS_PER_INSERT` rows of values."""
    head, values = sql.split(" VALUES ", 1)
    one, tail = values.split(")", 1)
    return f"{head} VALUES {', '.join([one + ')'] * ROWS_PER_INSERT)}{tail}"


#: Rows from which a run of rows sharing values is worth a :class:`SharedRows` run.
RUN_MIN = ROWS_PER_INSERT


class SharedRows:
    """The rows of one INSERT (``sql``: one row of ``width`` values, an upsert clause allowed
    after it), gathered in runs whose rows share values, written by :meth:`write`.

    A bulk apply writes thousands of rows of one state: the same six state columns (and more)
    in every row. A run names, by a template, which columns come from each row's own values
    (``template[c] = i >= 0``: the row's i-th value) and which are the run's shared values
    (``template[c] = -1 - j``: the j-th shared value). Its rows are then written
    :data:`ROWS_PER_INSERT` at a time by a statement that binds each shared value once for
    them all (numbered parameters), not once per row: the binding of the parameters was about
    a third of SQLite's work for such rows. Rows not in a run (:meth:`add_row`), and the last
    rows of a run short of a whole statement, are written as :func:`insert_flat` writes them.
    Rows are written in the order added within each kind; the caller's rows have distinct
    keys (one upsert per key), so the order between runs and other rows changes nothing.
    Callers add as runs only rows enough for a whole statement or more (:data:`RUN_MIN`).
    """

    __slots__ = ("_runs", "flat", "sql", "width")

    def __init__(self, sql: str, width: int) -> None:
        self.sql = sql
        self.width = width
        #: Whole rows, one after the other (:func:`insert_flat`).
        self.flat: list[Any] = []
        self._runs: list[tuple[tuple[int, ...], tuple[Any, ...], list[Any]]] = []

    def add_run(self, template: tuple[int, ...], shared: tuple[Any, ...], own: list[Any]) -> None:
        """Add a run of rows laid out by ``template`` sharing ``shared``, with ``own`` their
        own values, one row after the other (the list is kept: leave it unchanged)."""
        self._runs.append((template, shared, own))

    def write(self, db: sqlite3.Connection) -> None:
        """Run the INSERTs of every row gathered (once)."""
        flat = self.flat
        width = self.width
        statements: dict[tuple[int, ...], list[list[Any]]] = {}
        for template, shared, own in self._runs:
            per_row = max(template) + 1
            count = len(own) // per_row
            whole = count - count % ROWS_PER_INSERT
            if whole:
                size = per_row * ROWS_PER_INSERT
                tail = list(shared)
                chunks_of = statements.setdefault(template, [])
                for start in range(0, whole * per_row, size):
                    chunk = own[start : start + size]
                    chunk += tail
                    chunks_of.append(chunk)
            for start in range(whole * per_row, len(own), per_row):
                row = own[start : start + per_row]
                flat.extend([row[t] if t >= 0 else shared[-1 - t] for t in template])
        for template, params in statements.items():
            db.executemany(_shared_rows(self.sql, template), params)
        if flat:
            insert_flat(db, self.sql, flat, width)
        self._runs = []
        self.flat = []


@functools.lru_cache(maxsize=64)
def _shared_rows(sql: str, template: tuple[int, ...]) -> str:
    """``sql`` (one row of values) with :data:`ROWS_PER_INSERT` rows laid out by ``template``
    (:class:`SharedRows`): the rows' own values first, row after row, then the shared ones."""
    head, values = sql.split(" VALUES ", 1)
    _, tail = values.split(")", 1)
    per_row = max(template) + 1
    base = per_row * ROWS_PER_INSERT
    rows = []
    for row in range(ROWS_PER_INSERT):
        slots = [f"?{row * per_row + t + 1}" if t >= 0 else f"?{base - t}" for t in template]
        rows.append(f"({', '.join(slots)})")
    return f"{head} VALUES {', '.join(rows)}{tail}"
