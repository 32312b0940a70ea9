"""A Jellyfin emulator for tests, benchmarks and the demo: ``from jfsync.emulator import Emulator``.

The emulator behaves like Jellyfin 10.8 to 12 as the fact sheet describes (auth, REST routes,
per-user websocket routing, the 500 ms echo debounce, KeepAlive) and has test controls.
``request_observers`` is a module-level list of callables; every emulator calls each of them
synchronously with ``(emulator, record)`` for every HTTP request it answers, after recording it
in ``emulator.requests``. Append and remove observers; do not rebind the list.
"""

from __future__ import annotations

from collections.abc import Callable

from jfsync.emulator.library import LibraryItem
from jfsync.emulator.server import Emulator
from jfsync.emulator.state import RequestRecord, StoredUserData, WriteRecord

#: Called with (emulator, record) for every HTTP request any emulator answers.
request_observers: list[Callable[[Emulator, RequestRecord], None]] = []

__all__ = [
    "Emulator",
    "LibraryItem",
    "RequestRecord",
    "StoredUserData",
    "WriteRecord",
    "request_observers",
]
