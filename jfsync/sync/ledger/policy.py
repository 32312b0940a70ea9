"""The policy the ledger applies: the merge policy in force and each person's choices by user id.

:class:`LedgerPolicy` pairs the :class:`~jfsync.sync.merge.MergePolicy` (servers in config
order, registers synced, seed, send-only and receive-only servers, per-person register choices
by canonical user key) with those choices by the user ids the ledger's rows carry, and answers
what queuing a row asks: which registers may be owed to a server for a person
(:meth:`LedgerPolicy.synced_of`). It is immutable: a config reload gives the ledger a new one
(``Ledger.set_policy``), used from the next transaction on, so one transaction never sees two.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from jfsync.model import Register
from jfsync.sync.merge import MergePolicy

_NO_CHOICES: Mapping[int, frozenset[Register]] = MappingProxyType({})


class LedgerPolicy:
    """The merge policy in force (:attr:`merge`) and the registers each person syncs, by id."""

    __slots__ = ("_by_uid", "merge")

    def __init__(
        self, merge: MergePolicy, by_uid: Mapping[int, frozenset[Register]] = _NO_CHOICES
    ) -> None:
        self.merge = merge
        #: User id -> the registers that person syncs, for people with choices of their own.
        self._by_uid: Mapping[int, frozenset[Register]] = MappingProxyType(dict(by_uid))

    def __repr__(self) -> str:
        return f"LedgerPolicy({self.merge!r}, choices of {len(self._by_uid)} people)"

    def synced_of(self, uid: int, server: str | None) -> frozenset[Register]:
        """The registers that may be owed to ``server`` for user ``uid`` (none: send-only).

        ``server`` is the config name (None: a server the ledger has no name for, which is
        owed what the person syncs, as any other).
        """
        merge = self.merge
        if server is not None and server in merge.send_only:
            return frozenset()
        return self._by_uid.get(uid, merge.synced)
