"""The state cache: decoded state of recently used (user, item) pairs, kept between transactions.

A pair held here is known completely: its canonical state (or that it has none) and, for every
server, its last-known state, pending echoes and outbox row (or their absence). Transactions
that work on pairs read them from here instead of reloading and decoding the same rows from
SQLite. Only :class:`jfsync.sync.ledger.writer.StateWriter` adds to it or changes it, once a
transaction has committed: it is the one code that writes the cached tables, so the cache cannot
miss a write (the ledger empties it after a transaction that did not end normally). Bounded to
``limit`` pairs, least recently used dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Set
from types import MappingProxyType
from typing import Any, cast

from jfsync.heap import drain
from jfsync.model import UserData
from jfsync.sync.echo import PendingWrite
from jfsync.sync.ledger.codec import Key, Pair
from jfsync.sync.ledger.outbox import WorkRow
from jfsync.sync.merge import CanonicalState

#: (user, item) pairs whose decoded state the ledger keeps between transactions. A burst of
#: 10,000 changes stays inside it; at about 1.5 KB a pair it costs some 30 MB when full.
STATE_CACHE_PAIRS = 20_000


#: The parts a pair has none of, shared by every pair (read-only: a pair's first value of a
#: part gets a dict of its own, :meth:`CachedPair.put_lk` and the others).
_NONE: Mapping[Any, Any] = MappingProxyType({})


class CachedPair:
    """Everything the ledger holds for one (user, item) pair, decoded, by (user, item, server)
    key (as a transaction's working set keys them: it takes each part in one dict update).

    Read the parts; change them only through the ``put_*`` methods.
    """

    __slots__ = ("canon", "echo", "lk", "rows")

    def __init__(self, canon: CanonicalState | None) -> None:
        # A plain class: thousands are built per burst, and a dataclass with default
        # factories costs several times more to construct. The parts start as one shared
        # empty mapping: a pair new in a bulk apply holds no echo and often no row.
        self.canon = canon
        self.lk: Mapping[Key, UserData] = _NONE
        self.echo: Mapping[Key, tuple[PendingWrite, ...]] = _NONE
        self.rows: Mapping[Key, WorkRow] = _NONE

    def put_lk(self, key: Key, state: UserData) -> None:
        """Set the last-known state of ``key``."""
        lk = self.lk
        if lk is _NONE:
            self.lk = {key: state}
        else:
            cast(dict[Key, UserData], lk)[key] = state

    def put_echo(self, key: Key, pending: tuple[PendingWrite, ...]) -> None:
        """Set the pending echoes of ``key`` (empty: it has none)."""
        echo = self.echo
        if echo is _NONE:
            if pending:
                self.echo = {key: pending}
        elif pending:
            cast(dict[Key, tuple[PendingWrite, ...]], echo)[key] = pending
        else:
            cast(dict[Key, tuple[PendingWrite, ...]], echo).pop(key, None)

    def put_row(self, key: Key, row: WorkRow | None) -> None:
        """Set the outbox row of ``key`` (None: it has none)."""
        rows = self.rows
        if rows is _NONE:
            if row is not None:
                self.rows = {key: row}
        elif row is not None:
            cast(dict[Key, WorkRow], rows)[key] = row
        else:
            cast(dict[Key, WorkRow], rows).pop(key, None)


class StateCache:
    """Decoded state of up to ``limit`` (user, item) pairs, as the ledger file holds them."""

    def __init__(self, limit: int = STATE_CACHE_PAIRS) -> None:
        self.limit = limit
        self._pairs: OrderedDict[Pair, CachedPair] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pairs)

    def __contains__(self, pair: object) -> bool:
        return pair in self._pairs

    def take(
        self, pairs: Iterable[Pair], skip: Set[Pair], found: dict[Pair, CachedPair]
    ) -> set[Pair]:
        """Put the held ones of ``pairs`` (now the most recently used) but those in ``skip``
        into ``found``; return the others. Read the entries, never change them."""
        held = self._pairs
        get, used = held.get, held.move_to_end
        missing: set[Pair] = set()
        check = bool(skip)
        for pair in pairs:
            entry = None if check and pair in skip else get(pair)
            if entry is None:
                missing.add(pair)
            else:
                used(pair)
                found[pair] = entry
        return missing

    def clear(self) -> None:
        """Forget every pair.

        A slice at a time (:func:`jfsync.heap.drain`), not ``dict.clear()``: freeing a full
        cache (tens of thousands of decoded states) in one C call holds the GIL for tens of
        milliseconds (41 ms seen at 2 x 200k), on SQLite's thread, where the event loop cannot
        take it back.
        """
        drain(self._pairs)

    def evict(self, pairs: Iterable[Pair]) -> None:
        """Forget the given pairs."""
        for pair in pairs:
            self._pairs.pop(pair, None)

    def committed(
        self,
        read: Mapping[Pair, CachedPair],
        canon: Iterable[Mapping[Pair, CanonicalState]],
        lk: Iterable[Mapping[Key, UserData]],
        echo: Iterable[Mapping[Key, tuple[PendingWrite, ...]]],
        rows: Mapping[Key, WorkRow | None],
    ) -> None:
        """Take what a committed transaction read from SQLite, then what it wrote.

        ``read`` holds pairs as they were read (complete); ``canon``, ``lk`` and ``echo`` the
        values the transaction wrote, in the order it wrote them (a later one replaces an
        earlier one), and ``rows`` the final row of each key written (an empty echo list or a
        None row: deleted). Written pairs not held stay unheld: only complete pairs are kept.
        """
        held = self._pairs
        held.update(read)
        while len(held) > self.limit:
            held.popitem(last=False)
        get = held.get
        for states in canon:
            for pair, state in states.items():
                entry = get(pair)
                if entry is not None:
                    entry.canon = state
        # put_lk, put_echo and put_row inline on their usual paths (a bulk apply writes a
        # state and a row per pair, a pusher round an echo per key).
        for known_states in lk:
            for key, known in known_states.items():
                entry = get((key[0], key[1]))
                if entry is not None:
                    parts = entry.lk
                    if parts is _NONE:
                        entry.lk = {key: known}
                    else:
                        parts[key] = known  # type: ignore[index]
        for echoes in echo:
            for key, pending in echoes.items():
                entry = get((key[0], key[1]))
                if entry is not None:
                    if pending and entry.echo is not _NONE:
                        entry.echo[key] = pending  # type: ignore[index]
                    else:
                        entry.put_echo(key, pending)
        for key, row in rows.items():
            entry = get((key[0], key[1]))
            if entry is not None:
                if row is None:
                    entry.put_row(key, None)
                    continue
                held_rows = entry.rows
                if held_rows is _NONE:
                    entry.rows = {key: row}
                else:
                    held_rows[key] = row  # type: ignore[index]
