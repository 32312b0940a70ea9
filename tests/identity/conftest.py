"""Fixtures for the identity tests: emulators with unequal libraries and jfsync between them.

A :class:`Stack` holds named emulators (built from the same seed, so they hold the same titles
with the same provider ids in the same order, under path roots of the test's choosing) and the
:class:`SyncService` replicating between them; the service can be stopped and started again on
the same ledger. :meth:`Stack.pairs` lines up the leaf items of two servers by title.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from jfsync.config import Config
from jfsync.emulator import Emulator, LibraryItem, WriteRecord
from jfsync.model import UserData
from jfsync.service import SyncService
from jfsync.sync.identity import ItemIdentity
from jfsync.sync.subscriber import SubscriberState
from jfsync.timing import Clock, backoff_delays

API_KEY = "0123456789abcdef0123456789abcdef"
USER = "alice"
#: Real-time bound on one wait for loopback I/O; never a wait for time to pass.
WAIT_S = 20.0
#: Service options that keep real-time waits in tests tiny.
PUSHER_OPTIONS: dict[str, Any] = {
    "retry_initial_s": 0.005,
    "retry_max_s": 0.02,
    "probe_initial_s": 0.01,
    "probe_max_s": 0.05,
    "auth_retry_s": 0.05,
    "idle_poll_s": 1.0,
}
SUBSCRIBER_OPTIONS: dict[str, Any] = {"delays": lambda: backoff_delays(base_s=0.01, cap_s=0.05)}
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


@dataclass
class Stack:
    """Named emulators and the jfsync service between them."""

    emus: dict[str, Emulator]
    config: Config
    service: SyncService | None = None
    clock: Clock | None = None
    services: list[SyncService] = field(default_factory=list)

    async def start_service(
        self,
        *,
        clock: Clock | None = None,
        connect: bool = True,
        identity: Callable[[SyncService], ItemIdentity] | None = None,
    ) -> SyncService:
        """Start jfsync on the stack's ledger (again, after a stop).

        ``identity`` builds the service's identity (it needs the service's ledger and clock).
        """
        self.clock = clock
        service = SyncService(
            self.config,
            clock=clock,
            subscriber_options=SUBSCRIBER_OPTIONS,
            pusher_options=PUSHER_OPTIONS,
            reconcile_options=RECONCILE_OPTIONS,
        )
        if identity is not None:
            service.identity = identity(service)
        self.service = service
        self.services.append(service)
        await service.start()
        if connect:
            await self.wait_connected()
        return service

    async def stop_service(self) -> None:
        """Stop jfsync (the emulators keep running)."""
        if self.service is not None:
            await self.service.stop()
            self.service = None

    def svc(self) -> SyncService:
        """The running service."""
        assert self.service is not None
        return self.service

    async def wait_connected(self) -> None:
        """Wait until every synced user of every server has a live socket (resync done)."""

        def ready() -> bool:
            links = self.svc().links.values()
            return all(
                link.subscribers
                and all(s.state is SubscriberState.CONNECTED for s in link.subscribers.values())
                for link in links
            )

        await self.wait(ready)

    async def wait(self, predicate: Callable[[], bool | Awaitable[bool]]) -> None:
        """Wait until ``predicate`` holds, re-checked whenever jfsync applies or writes."""
        await self.svc().wait_for(predicate, WAIT_S)

    def data(self, server: str, item: str, user: str = USER) -> UserData:
        """What ``server`` holds for the user and item."""
        emu = self.emus[server]
        return emu.user_data(emu.user_id(user), item)

    def change(self, server: str, item: str, user: str = USER, **kw: Any) -> UserData:
        """Change the user's data on ``server`` as a user there would (it echoes)."""
        emu = self.emus[server]
        return emu.save_user_data(emu.user_id(user), item, **kw)

    def holds(self, server: str, item: str, expected: UserData, user: str = USER) -> bool:
        """Tell whether ``server`` holds ``expected``."""
        return self.data(server, item, user) == expected

    def writes(self, server: str, items: set[str] | None = None) -> list[WriteRecord]:
        """Successful user-data writes ``server`` received (for ``items`` only, if given)."""
        return [
            w
            for w in self.emus[server].writes
            if w.status < 300 and (items is None or w.item_id in items)
        ]

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


def make_config(
    emus: dict[str, Emulator],
    ledger: Path,
    *,
    rewrites: dict[str, list[tuple[str, str]]] | None = None,
    users: dict[str, Any] | None = None,
    sync: dict[str, Any] | None = None,
) -> Config:
    """A config syncing every emulator (config order = dict order)."""
    return Config.model_validate(
        {
            "ledger": str(ledger),
            "servers": [
                {
                    "name": name,
                    "url": emu.url,
                    "api_key": API_KEY,
                    "timeout_s": 5,
                    "path_rewrites": [
                        {"from": old, "to": new} for old, new in (rewrites or {}).get(name, [])
                    ],
                }
                for name, emu in emus.items()
            ],
            "users": users or {},
            "sync": {"shutdown_grace": 2, **(sync or {})},
        }
    )


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    """Build stacks from emulators (started here) and a config; tear everything down after."""
    stacks: list[Stack] = []

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
        named = {e.server_name: e for e in emus}
        for emu in emus:
            await emu.start()
        ledger = tmp_path / f"ledger-{len(stacks)}.db"
        stack = Stack(named, make_config(named, ledger, rewrites=rewrites, users=users, sync=sync))
        stacks.append(stack)
        if before_start is not None:
            before_start(stack)
        if start:
            await stack.start_service(clock=clock)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            for service in stack.services:
                await service.stop()
            for emu in stack.emus.values():
                await emu.close()
