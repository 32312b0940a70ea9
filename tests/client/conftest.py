"""Fixtures for the REST client tests: emulators on loopback and clients pointed at them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.jellyfin.api import JellyfinClient
from tests.support.emulators import MakeEmulator, emulator_factory

API_KEY = "0123456789abcdef0123456789abcdef"
USERS = [("alice", "alice-pw-1"), ("bob", "bob-pw-2"), ("Carol", "carol-pw-3")]
#: Every secret the tests use; no output may contain any of them.
SECRETS = [API_KEY, *(pw for _, pw in USERS)]

MakeClient = Callable[..., JellyfinClient]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One shared connection pool, as jfsync uses."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_emulator() -> AsyncIterator[MakeEmulator]:
    """Start emulators on loopback (defaults: 10.10.7, small library); close them all after."""
    async with emulator_factory(
        api_key=API_KEY,
        users=USERS,
        library_size=40,
        seed=1,
        server_version="10.10.7",
    ) as make:
        yield make


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
