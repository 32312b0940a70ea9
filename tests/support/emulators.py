"""Start emulators on loopback for a test, with per-suite defaults, and close them all after."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from jfsync.emulator import Emulator

MakeEmulator = Callable[..., Awaitable[Emulator]]


@asynccontextmanager
async def emulator_factory(**defaults: Any) -> AsyncIterator[MakeEmulator]:
    """Yield ``make(**overrides)`` that starts an emulator; every one is closed on exit."""
    started: list[Emulator] = []

    async def make(**kwargs: Any) -> Emulator:
        emu = Emulator(**{**defaults, **kwargs})
        await emu.start()
        started.append(emu)
        return emu

    try:
        yield make
    finally:
        for emu in reversed(started):
            await emu.close()
