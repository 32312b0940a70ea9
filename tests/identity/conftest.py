"""Fixtures for the identity tests: emulators with unequal libraries and jfsync between them.

A :class:`Stack` is the suite's shared cluster (:mod:`tests.support.cluster`): named emulators
(built from the same seed, so they hold the same titles with the same provider ids in the same
order, under path roots of the test's choosing) and the :class:`SyncService` replicating between
them; the service can be stopped and started again on the same ledger. :meth:`Stack.pairs` lines up the leaf items of two servers by title.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from jfsync.emulator import Emulator, LibraryItem
from jfsync.timing import Clock
from tests.support.cluster import USER, Cluster, StartCluster
from tests.support.config import API_KEY
from tests.support.waiting import WAIT_S

__all__ = ["API_KEY", "USER", "WAIT_S", "MakeStack", "Stack", "emulator", "make_stack"]

#: Service options that keep real-time waits in tests tiny.
RECONCILE_OPTIONS: dict[str, Any] = {"library_debounce_s": 0.01}


def emulator(
    name: str,
    *,
    root: str = "/media",
    provider_ids: bool = True,
    leaves: int = 24,
    users: list[tuple[str, str]] | None = None,
) -> Emulator:
    """An emulator whose library has the shared titles under ``root``."""
    return Emulator(
        api_key=API_KEY,
        server_name=name,
        library_size=leaves,
        seed=11,
        path_root=root,
        provider_ids=provider_ids,
        debounce_s=0.02,
        library_debounce_s=0.02,
        users=users,
    )


class Stack(Cluster):
    """The shared cluster with the identity tests' vocabulary (emulators by name)."""

    @property
    def emus(self) -> dict[str, Emulator]:
        """The emulators by server name, in config order."""
        return self.servers

    def pairs(
        self, a: str, b: str, skip: set[str] | None = None
    ) -> list[tuple[LibraryItem, LibraryItem]]:
        """The leaf items of ``a`` and ``b`` lined up by title (same generator, same order).

        Items added by the test come last; ``skip`` leaves some out by id.
        """
        left = [i for i in self.emus[a].leaf_items() if i.id not in (skip or set())]
        right = [i for i in self.emus[b].leaf_items() if i.id not in (skip or set())]
        assert [i.name for i in left] == [i.name for i in right]
        return list(zip(left, right, strict=True))

    def pair_status(self, a: str, b: str) -> dict[str, Any]:
        """The identity details of one server pair."""
        for pair in self.svc().identity_details()["pairs"]:
            if pair["servers"] == [a, b]:
                return dict(pair)
        raise KeyError((a, b))


MakeStack = Callable[..., Awaitable[Stack]]


def path_rewrites(rewrites: dict[str, list[tuple[str, str]]] | None) -> dict[str, Any]:
    """``server_extra`` for the config: each server's path rewrites (old prefix, new prefix)."""
    return {
        name: {"path_rewrites": [{"from": old, "to": new} for old, new in pairs]}
        for name, pairs in (rewrites or {}).items()
    }


@pytest.fixture
def make_stack(start_cluster: StartCluster) -> MakeStack:
    """Build stacks from emulators (started here) and a config; tear everything down after."""

    async def make(
        emus: list[Emulator],
        *,
        rewrites: dict[str, list[tuple[str, str]]] | None = None,
        users: dict[str, Any] | None = None,
        sync: dict[str, Any] | None = None,
        before_start: Callable[[Stack], None] | None = None,
        start: bool = True,
        clock: Clock | None = None,
    ) -> Stack:
        stack: Stack = await start_cluster(
            emus,
            cls=Stack,
            server_extra=path_rewrites(rewrites),
            users=users,
            sync=sync,
            before_start=before_start,
            start=start,
            clock=clock,
            reconcile_options=RECONCILE_OPTIONS,
        )
        return stack

    return make
