"""Fixtures for the operating tests: two emulators, the replicator and its status server.

``make_stack`` builds a :class:`Stack`: two emulators ("home" and "cabin") generated from one
seed (so their item ids match), a :class:`SyncService` replicating between them, and a
:class:`StatusServer` on a free loopback port; everything is closed at teardown. Waits are on
events (``service.wait_for`` re-checks whenever jfsync applies or writes), never on time.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from jfsync.config import Config
from jfsync.emulator import Emulator
from jfsync.model import UserData
from jfsync.ops.status import StatusServer
from jfsync.service import SyncService
from jfsync.timing import backoff_delays

#: Real-time bound for one wait on loopback I/O; never a wait for time to pass.
WAIT_S = 20.0
KEYS = {"home": "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "cabin": "f9e8d7c6b5a4938271605f4e3d2c1b0a"}
#: Pushers that retry in milliseconds, except a refused key: that pause must stay visible.
PUSHER: dict[str, Any] = {
    "retry_initial_s": 0.005,
    "retry_max_s": 0.02,
    "probe_initial_s": 0.01,
    "probe_max_s": 0.05,
    "auth_retry_s": 300.0,
    "idle_poll_s": 1.0,
}


def free_port() -> int:
    """A free loopback port (for a status endpoint a child process or run_service binds)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def emulators() -> AsyncIterator[dict[str, Emulator]]:
    """Two started emulators ("home", "cabin") sharing one library."""
    emus = {
        name: Emulator(
            api_key=KEYS[name], server_name=name, library_size=10, seed=7, debounce_s=0.02
        )
        for name in ("home", "cabin")
    }
    for emu in emus.values():
        await emu.start()
    yield emus
    for emu in emus.values():
        await emu.close()


def _fast_delays() -> Any:
    return backoff_delays(base_s=0.01, cap_s=0.05)


@dataclass
class Stack:
    """Two emulators, the service between them and its status server."""

    home: Emulator
    cabin: Emulator
    service: SyncService
    server: StatusServer
    http: aiohttp.ClientSession
    token: str | None
    items: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The status server's base URL."""
        return self.server.url

    async def get(
        self, path: str, *, token: str | bool | None = True, method: str = "GET"
    ) -> tuple[int, str]:
        """Request ``path`` from the status server (``token=True``: the configured one)."""
        use = self.token if token is True else (None if token is False else token)
        headers = {"Authorization": f"Bearer {use}"} if use else {}
        async with self.http.request(method, self.url + path, headers=headers) as response:
            return response.status, await response.text()

    async def wait_for(self, predicate: Callable[[], Any]) -> None:
        """Wait until ``predicate`` holds (it may be async)."""
        await self.service.wait_for(predicate, WAIT_S)

    async def wait_connected(self) -> None:
        """Wait until every user of both servers has a live socket."""

        def ready() -> bool:
            links = self.service.links.values()
            return all(
                len(link.subscribers) == 2
                and all(str(s.status.state) == "connected" for s in link.subscribers.values())
                for link in links
            )

        await self.wait_for(ready)

    def user_data(self, emu: Emulator, item: str, user: str = "alice") -> UserData:
        """What ``emu`` holds for ``user`` and ``item``."""
        return emu.user_data(emu.user_id(user), item)

    def change(self, emu: Emulator, item: str, user: str = "alice", **kw: Any) -> UserData:
        """Change user data on ``emu`` as a user of that server would."""
        return emu.save_user_data(emu.user_id(user), item, **kw)

    async def flow(self, source: Emulator, item: str, **kw: Any) -> None:
        """Change ``item`` on ``source`` and wait until the other server holds the same."""
        target = self.cabin if source is self.home else self.home
        expected = self.change(source, item, **kw)
        await self.wait_for(lambda: self.user_data(target, item) == expected)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """Build stacks on demand; every one is closed at teardown."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def factory(
        *,
        token: str | None = None,
        users: list[tuple[str, str]] | None = None,
        server_extra: dict[str, dict[str, Any]]
        | Callable[[dict[str, Emulator]], dict[str, dict[str, Any]]]
        | None = None,
        pusher: dict[str, Any] | None = None,
        connect: bool = True,
        before_start: Callable[[Config], None] | None = None,
        config_extra: dict[str, Any] | None = None,
        service_options: dict[str, Any] | None = None,
    ) -> Stack:
        emus = {
            name: Emulator(
                api_key=KEYS[name],
                users=users,
                server_name=name,
                library_size=20,
                seed=7,
                debounce_s=0.02,
            )
            for name in ("home", "cabin")
        }
        for emu in emus.values():
            await emu.start()
            closers.append(emu.close)
        extra = server_extra(emus) if callable(server_extra) else (server_extra or {})
        raw: dict[str, Any] = {
            "ledger": str(tmp_path / f"ledger-{len(closers)}.db"),
            "servers": [
                {
                    "name": name,
                    "url": emu.url,
                    "api_key": KEYS[name],
                    "timeout_s": 5,
                    **extra.get(name, {}),
                }
                for name, emu in emus.items()
            ],
            "sync": {"shutdown_grace": 2},
        }
        if token is not None:
            raw["status"] = {"token": token}
        raw.update(config_extra or {})
        config = Config.model_validate(raw)
        if before_start is not None:
            before_start(config)
        service = SyncService(
            config,
            subscriber_options={"delays": _fast_delays},
            pusher_options={**PUSHER, **(pusher or {})},
            **(service_options or {}),
        )
        await service.start()
        closers.append(service.stop)
        server = StatusServer(service, host="127.0.0.1", port=0, token=token)
        await server.start()
        closers.append(server.stop)
        http = aiohttp.ClientSession()
        closers.append(http.close)
        stack = Stack(emus["home"], emus["cabin"], service, server, http, token)
        stack.items = [item.id for item in stack.home.leaf_items()]
        if connect:
            await stack.wait_connected()
        return stack

    yield factory
    errors: list[BaseException] = []
    for close in reversed(closers):
        try:
            await close()
        except Exception as err:  # close the rest, then report
            errors.append(err)
    if errors:
        raise errors[0]
