"""Fixtures for the replication tests: the shared cluster fixture, preset to servers a, b, c."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from jfsync.timing import Clock, ManualClock
from tests.replication.harness import DEBOUNCE_S, Cluster, new_emulator
from tests.support.cluster import StartCluster

MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
def make_cluster(start_cluster: StartCluster) -> MakeCluster:
    """Start emulators ``a``, ``b`` (, ``c``) and jfsync between them; stop all at teardown."""

    async def make(
        servers: int = 3,
        *,
        leaves: int = 40,
        debounce_s: float | dict[str, float] = DEBOUNCE_S,
        emulator_clocks: dict[str, Clock] | None = None,
        clock: Clock | None = None,
        pusher_options: dict[str, Any] | None = None,
        gated: tuple[str, ...] = (),
        connect: bool = True,
        sync: dict[str, Any] | None = None,
        server_version: str | None = None,
        session_options: dict[str, Any] | None = None,
        server_keys: dict[str, dict[str, Any]] | None = None,
        users: dict[str, Any] | None = None,
        users_connected: int | None = None,
    ) -> Cluster:
        emus = []
        for name in "abc"[:servers]:
            debounce = debounce_s[name] if isinstance(debounce_s, dict) else debounce_s
            clock_of = (emulator_clocks or {}).get(name)
            versioned = {} if server_version is None else {"server_version": server_version}
            emus.append(new_emulator(name, leaves, debounce, clock=clock_of, **versioned))
        manual = {
            name: clk
            for name, clk in (emulator_clocks or {}).items()
            if isinstance(clk, ManualClock)
        }
        cluster: Cluster = await start_cluster(
            emus,
            cls=Cluster,
            gated=gated,
            manual_clocks=manual,
            sync=sync,
            clock=clock,
            pusher_options=pusher_options,
            server_extra=server_keys,
            users=users,
            service_options=(
                {"session_options": session_options} if session_options is not None else None
            ),
            connect=False,
        )
        if connect:
            await cluster.wait_connected(users_connected)
        return cluster

    return make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session for acting as a user of an emulator."""
    async with aiohttp.ClientSession() as session:
        yield session
