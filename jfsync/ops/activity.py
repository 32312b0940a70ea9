"""The activity feed: a bounded in-memory ring of the changes jfsync received and wrote.

:class:`ActivityFeed` keeps the last few hundred changes (``DEFAULT_CAPACITY``). An entry is
made where jfsync applies a change a server showed it (a websocket event, a catch-up scan, a
read-back or a reconcile), with the user, the item, the server it came from, the registers it
changed and the peers it is now owed to; the pusher's acknowledgement of each write fills in
that peer's delivery time and latency. A write with no entry (queued before a restart, or
pushed out of the ring) gets an entry of its own with an unknown source. Recording costs a few
dict operations and no I/O: item names are looked up in the library index only when the feed is
shown (``/status``), for the entries that have none yet, and then kept. :func:`shown_key` tells
when an entry shown again is shown the same (the status server then reuses its encoding).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Entries kept (the oldest drop out first).
DEFAULT_CAPACITY = 300
#: Entries /status lists (newest first).
SHOWN_IN_STATUS = 100


@dataclass(slots=True, eq=False)
class Delivery:
    """One peer a change is owed to, and when it was written there."""

    server: str
    registers: tuple[str, ...]
    #: ``queued`` until written, ``written``, or ``superseded`` by a newer change of the item
    #: (one write then delivers both; that write is shown on the newer entry).
    state: str = "queued"
    done_ms: int | None = None
    latency_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form /status shows."""
        return {
            "server": self.server,
            "registers": list(self.registers),
            "state": self.state,
            "done_ms": self.done_ms,
            "latency_s": self.latency_s,
        }


@dataclass(slots=True, eq=False)
class ActivityEntry:
    """One change jfsync received (or one write whose change it did not see)."""

    seq: int
    at_ms: int
    user: str
    item: str
    source: str | None
    kind: str
    registers: tuple[str, ...]
    to: list[Delivery] = field(default_factory=list)
    name: str | None = None

    def as_dict(self, user_names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The JSON form /status shows (``user_names``: canonical key -> account name)."""
        return {
            "seq": self.seq,
            "at_ms": self.at_ms,
            "user": self.user,
            "user_name": (user_names or {}).get(self.user, self.user),
            "item": self.item,
            "name": self.name,
            "from": self.source,
            "kind": self.kind,
            "registers": list(self.registers),
            "to": [d.as_dict() for d in self.to],
        }


def shown_key(shown: Mapping[str, Any]) -> tuple[Any, ...]:
    """What tells two JSON forms (:meth:`ActivityEntry.as_dict`, as /status shows it) of the
    same entry apart: the entry (``seq``) and every field that can change after it was made
    (its item's name, the user's name, each delivery's state, time and latency; the status
    may show a queued delivery as ``dead``). Equal keys, equal forms: /status encodes each
    entry once while it stays the same. Keep it in step with ``as_dict``."""
    return (
        shown["seq"],
        shown["name"],
        shown["user_name"],
        tuple((d["state"], d["done_ms"], d["latency_s"]) for d in shown["to"]),
    )


#: Register sets already put in display form: the subsets of three registers, 8 at most
#: (:data:`_NAMED_KEPT` bounds it for any other caller).
_NAMED: dict[frozenset[object], tuple[str, ...]] = {}
_NAMED_KEPT = 128


def _registers(values: Iterable[object]) -> tuple[str, ...]:
    """Register names, sorted: made once per distinct set (the ledger's results share their
    frozensets), not once per change of a 10,000-item bulk action."""
    if isinstance(values, frozenset):
        named = _NAMED.get(values)
        if named is None:
            named = tuple(sorted(str(v) for v in values))
            if len(_NAMED) < _NAMED_KEPT:
                _NAMED[values] = named
        return named
    return tuple(sorted(str(v) for v in values))


class ActivityFeed:
    """The last ``capacity`` changes, newest last; deliveries matched by (user, item, peer)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("the activity feed needs room for at least one entry")
        self._entries: deque[ActivityEntry] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        #: (user, item, peer) -> the newest entry still waiting for that peer's write.
        self._pending: dict[tuple[str, str, str], ActivityEntry] = {}
        #: Canonical user key -> the account's name, as the service matched it (for display).
        self.user_names: dict[str, str] = {}

    @property
    def capacity(self) -> int:
        """How many entries are kept."""
        maxlen = self._entries.maxlen
        assert maxlen is not None
        return maxlen

    def __len__(self) -> int:
        return len(self._entries)

    def record_change(
        self,
        *,
        at_ms: int,
        server: str,
        user: str,
        item: str,
        kind: str,
        registers: Iterable[object],
        owed: Mapping[str, Iterable[object]],
    ) -> ActivityEntry:
        """A change ``server`` showed was applied; ``owed`` are the peers it is queued for."""
        entry = ActivityEntry(
            seq=next(self._seq),
            at_ms=at_ms,
            user=user,
            item=item,
            source=server,
            kind=kind,
            registers=_registers(registers),
        )
        for peer, regs in owed.items():
            wanted = _registers(regs)
            if not wanted:
                continue
            entry.to.append(Delivery(peer, wanted))
            # A newer change of the same item coalesces with the older one in the outbox:
            # the write that follows delivers both; the older entry shows it as superseded.
            older = self._pending.get((user, item, peer))
            if older is not None:
                older_delivery = _delivery(older, peer)
                if older_delivery is not None and older_delivery.state == "queued":
                    older_delivery.state = "superseded"
            self._pending[(user, item, peer)] = entry
        self._append(entry)
        return entry

    def record_write(
        self,
        *,
        peer: str,
        user: str,
        item: str,
        registers: Iterable[object],
        done_ms: int,
        latency_s: float,
    ) -> ActivityEntry:
        """The pusher wrote ``registers`` of ``user``/``item`` to ``peer``."""
        entry = self._pending.pop((user, item, peer), None)
        if entry is not None:
            delivery = _delivery(entry, peer)
            if delivery is not None:
                delivery.state = "written"
                delivery.done_ms = done_ms
                delivery.latency_s = round(latency_s, 4)
                return entry
        regs = _registers(registers)
        entry = ActivityEntry(
            seq=next(self._seq),
            at_ms=done_ms,
            user=user,
            item=item,
            source=None,
            kind="write",
            registers=regs,
            to=[Delivery(peer, regs, "written", done_ms, round(latency_s, 4))],
        )
        self._append(entry)
        return entry

    def entries(self, limit: int | None = None) -> list[ActivityEntry]:
        """The newest ``limit`` entries (all by default), newest first."""
        newest = list(reversed(self._entries))
        return newest if limit is None else newest[: max(0, limit)]

    def unnamed(self, limit: int | None = None) -> dict[str, set[str]]:
        """Server -> canonical items of shown entries whose name is not known yet."""
        wanted: dict[str, set[str]] = {}
        for entry in self.entries(limit):
            if entry.name is None:
                server = entry.source or entry.to[0].server
                wanted.setdefault(server, set()).add(entry.item)
        return wanted

    def set_names(self, server: str, names: Mapping[str, str]) -> None:
        """Give entries their item names (looked up for ``server``)."""
        for entry in self._entries:
            if entry.name is None and (entry.source or entry.to[0].server) == server:
                entry.name = names.get(entry.item)

    def _append(self, entry: ActivityEntry) -> None:
        if self._entries.maxlen is not None and len(self._entries) == self._entries.maxlen:
            dropped = self._entries[0]
            for delivery in dropped.to:
                key = (dropped.user, dropped.item, delivery.server)
                if self._pending.get(key) is dropped:
                    del self._pending[key]
        self._entries.append(entry)


def _delivery(entry: ActivityEntry, peer: str) -> Delivery | None:
    return next((d for d in entry.to if d.server == peer), None)
