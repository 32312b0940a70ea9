"""Fixtures for the replication tests: a factory of emulated clusters with jfsync running."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.service import SyncService
from jfsync.timing import Clock, ManualClock
from tests.replication.harness import (
    DEBOUNCE_S,
    FAST_PUSHER,
    FAST_SUBSCRIBER,
    Cluster,
    SocketGate,
    make_config,
    new_emulator,
)

MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[MakeCluster]:
    """Start emulators ``a``, ``b`` (, ``c``) and jfsync between them; stop all at teardown."""
    made: list[Cluster] = []
    emus_started: list[Emulator] = []
    gates_started: list[SocketGate] = []

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
        users_connected: int = 2,
    ) -> Cluster:
        emus = []
        for name in "abc"[:servers]:
            debounce = debounce_s[name] if isinstance(debounce_s, dict) else debounce_s
            clock_of = (emulator_clocks or {}).get(name)
            versioned = {} if server_version is None else {"server_version": server_version}
            emu = new_emulator(name, leaves, debounce, clock=clock_of, **versioned)
            await emu.start()
            emus_started.append(emu)
            emus.append(emu)
        gates = {}
        for name in gated:
            gate = SocketGate(next(e for e in emus if e.server_name == name).port)
            await gate.start()
            gates_started.append(gate)
            gates[name] = gate

        def url_of(emu: Emulator) -> str:
            gate = gates.get(emu.server_name)
            return gate.url if gate is not None else emu.url

        config = make_config(
            emus, tmp_path / f"ledger-{len(made)}.db", url_of, sync, server_keys, users
        )
        service = SyncService(
            config,
            clock=clock,
            subscriber_options=FAST_SUBSCRIBER,
            pusher_options={**FAST_PUSHER, **(pusher_options or {})},
            session_options=session_options,
        )
        manual = {
            name: clk
            for name, clk in (emulator_clocks or {}).items()
            if isinstance(clk, ManualClock)
        }
        cluster = Cluster(emus, service, manual, gates)
        made.append(cluster)
        await service.start()
        if connect:
            await cluster.wait_connected(users_connected)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            await cluster.service.stop()
        for gate in gates_started:
            await gate.close()
        for emu in emus_started:
            await emu.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session for acting as a user of an emulator."""
    async with aiohttp.ClientSession() as session:
        yield session
