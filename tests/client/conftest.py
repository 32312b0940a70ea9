"""Fixtures for the REST client tests: emulators on loopback and clients pointed at them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.jellyfin.api import JellyfinClient

API_KEY = "0123456789abcdef0123456789abcdef"
USERS = [("alice", "alice-pw-1"), ("bob", "bob-pw-2"), ("Carol", "carol-pw-3")]
#: Every secret the tests use; no output may contain any of them.
SECRETS = [API_KEY, *(pw for _, pw in USERS)]

MakeEmulator = Callable[..., Awaitable[Emulator]]
MakeClient = Callable[..., JellyfinClient]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One shared connection pool, as jfsync uses."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_emulator() -> AsyncIterator[MakeEmulator]:
    """Start emulators on loopback (defaults: 10.10.7, small library); close them all after."""
    started: list[Emulator] = []

    async def make(**kwargs: Any) -> Emulator:
        options: dict[str, Any] = {
            "api_key": API_KEY,
            "users": USERS,
            "library_size": 40,
            "seed": 1,
            "server_version": "10.10.7",
        }
        options.update(kwargs)
        emu = Emulator(**options)
        await emu.start()
        started.append(emu)
        return emu

    yield make
    for emu in reversed(started):
        await emu.close()


@pytest.fixture
def make_client(http: aiohttp.ClientSession) -> MakeClient:
    """Build a client for an emulator (admin key unless told otherwise)."""

    def make(emu: Emulator, *, api_key: str = API_KEY, timeout_s: float = 10.0) -> JellyfinClient:
        return JellyfinClient(
            "emu", emu.url, api_key, session=http, device_id="jfsync-rest", timeout_s=timeout_s
        )

    return make


@pytest.fixture(params=["10.10.7", "10.11.11"])
def version(request: pytest.FixtureRequest) -> str:
    """The emulated versions every call is proven against."""
    return str(request.param)


@pytest.fixture
async def emu(make_emulator: MakeEmulator, version: str) -> Emulator:
    """An emulator of the parametrised version."""
    return await make_emulator(server_version=version)


@pytest.fixture
def client(emu: Emulator, make_client: MakeClient) -> JellyfinClient:
    """A client with the admin key for ``emu``."""
    return make_client(emu)
