"""Fixtures for the operating tests: two emulators, the replicator and its status server.

``make_stack`` builds a :class:`Stack`, the suite's shared cluster (:mod:`tests.support.cluster`):
two emulators ("home" and "cabin") generated from one
seed (so their item ids match), a :class:`SyncService` replicating between them, and a
:class:`StatusServer` on a free loopback port; everything is closed at teardown. Waits are on
events (``service.wait_for`` re-checks whenever jfsync applies or writes), never on time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from jfsync.config import Config
from jfsync.emulator import Emulator
from jfsync.model import UserData
from jfsync.ops.status import StatusServer
from tests.support.cluster import FAST_PUSHER, Cluster, StartCluster
from tests.support.config import free_port
from tests.support.waiting import WAIT_S

__all__ = ["KEYS", "PUSHER", "WAIT_S", "Stack", "StackFactory", "emulators", "free_port"]

KEYS = {"home": "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "cabin": "f9e8d7c6b5a4938271605f4e3d2c1b0a"}
#: Pushers that retry in milliseconds, except a refused key: that pause must stay visible.
PUSHER: dict[str, Any] = {**FAST_PUSHER, "auth_retry_s": 300.0}


def _emulator(name: str, library_size: int, users: list[tuple[str, str]] | None = None) -> Emulator:
    return Emulator(
        api_key=KEYS[name],
        users=users,
        server_name=name,
        library_size=library_size,
        seed=7,
        debounce_s=0.02,
    )


@pytest.fixture
async def emulators(start_cluster: StartCluster) -> dict[str, Emulator]:
    """Two started emulators ("home", "cabin") sharing one library."""
    emus = {name: _emulator(name, 10) for name in ("home", "cabin")}
    await start_cluster.start_emulators(emus.values())
    return emus


class Stack(Cluster):
    """The shared cluster with the operating tests' vocabulary: home, cabin, a status server."""

    server: StatusServer
    http: aiohttp.ClientSession
    token: str | None

    @property
    def home(self) -> Emulator:
        """The "home" emulator."""
        return self.servers["home"]

    @property
    def cabin(self) -> Emulator:
        """The "cabin" emulator."""
        return self.servers["cabin"]

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
        await self.wait(predicate)

    async def wait_connected(self, users: int | None = 2) -> None:
        """Wait until every user of both servers has a live socket."""
        await super().wait_connected(users)

    def user_data(self, emu: Emulator, item: str, user: str = "alice") -> UserData:
        """What ``emu`` holds for ``user`` and ``item``."""
        return self.data(emu, item, user)

    async def flow(self, source: Emulator, item: str, **kw: Any) -> None:
        """Change ``item`` on ``source`` and wait until the other server holds the same."""
        target = self.cabin if source is self.home else self.home
        expected = self.change(source, item, **kw)
        await self.wait_for(lambda: self.user_data(target, item) == expected)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
def make_stack(start_cluster: StartCluster) -> StackFactory:
    """Build stacks on demand (the shared cluster plus a status server); all closed at teardown."""

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
        emus = {name: _emulator(name, 20, users) for name in ("home", "cabin")}
        await start_cluster.start_emulators(emus.values())
        extra = server_extra(emus) if callable(server_extra) else (server_extra or {})
        stack: Stack = await start_cluster(
            list(emus.values()),
            cls=Stack,
            api_key=KEYS,
            server_extra=extra,
            status={"token": token} if token is not None else None,
            pusher_options={**PUSHER, **(pusher or {})},
            before_start=(lambda s: before_start(s.config)) if before_start else None,
            service_options=service_options,
            connect=False,
            **(config_extra or {}),
        )
        stack.token = token
        stack.server = StatusServer(stack.service, host="127.0.0.1", port=0, token=token)
        await stack.server.start()
        stack.closers.append(stack.server.stop)
        stack.http = aiohttp.ClientSession()
        stack.closers.append(stack.http.close)
        if connect:
            await stack.wait_connected()
        return stack

    return factory
