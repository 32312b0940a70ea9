"""What the emulator's parts may see of the server: typed views of :class:`Emulator`.

:mod:`jfsync.emulator.server` builds the routes (:mod:`jfsync.emulator.app`) and saves and
loads the state file (:mod:`jfsync.emulator.persist`), so those modules, and the route groups
and control routes they hand the server to, must not import ``server`` back, not even for an
annotation. They name one of these protocols instead, each listing exactly what its users touch:
:class:`SavedServer` for the state file, :class:`ControlledServer` for the test-control routes,
:class:`EmulatorLike` for the Jellyfin routes (which pass it on to the controls). ``Emulator``
satisfies all of them structurally; mypy checks that wherever ``server`` passes ``self``. Members
a user only reads are properties here, so a view can never rebind them.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, Protocol

from jfsync.emulator.library import Library, LibraryItem
from jfsync.emulator.sockets import SocketHub
from jfsync.emulator.state import (
    AccessToken,
    ApiKey,
    EmuUser,
    RequestRecord,
    ServerVersion,
    StoredUserData,
    UserDataStore,
    WriteRecord,
)
from jfsync.model import UserData
from jfsync.timing import Clock


class ServerCore(Protocol):
    """Who the server is and what it holds: its id, version, library and user data."""

    @property
    def server_id(self) -> str:
        """The server's id (32 hex digits)."""
        ...

    @property
    def version(self) -> str:
        """The emulated version string, e.g. ``"10.10.7"``."""
        ...

    @property
    def library(self) -> Library:
        """The items and folders."""
        ...

    @property
    def store(self) -> UserDataStore:
        """The user data of every user and item."""
        ...


class SavedServer(ServerCore, Protocol):
    """What the state file writes and restores (:mod:`jfsync.emulator.persist`)."""

    def kept_user_data(self) -> dict[str, dict[str, StoredUserData]]:
        """User data kept for removed items, by user-data key then user id (copies)."""
        ...

    def restore_kept_user_data(self, kept: dict[str, dict[str, StoredUserData]]) -> None:
        """Replace the user data kept for removed items."""
        ...


class ControlledServer(ServerCore, Protocol):
    """What the test-control routes read and drive (:mod:`jfsync.emulator.controls`)."""

    @property
    def server_name(self) -> str:
        """The name the server announces."""
        ...

    @property
    def url(self) -> str:
        """The base URL, ``http://host:port``."""
        ...

    @property
    def clock(self) -> Clock:
        """The injected clock."""
        ...

    @property
    def hub(self) -> SocketHub:
        """The websockets and sessions."""
        ...

    @property
    def users(self) -> dict[str, EmuUser]:
        """The users by id."""
        ...

    @property
    def requests(self) -> list[RequestRecord]:
        """Every HTTP request answered, oldest first."""
        ...

    @property
    def writes(self) -> list[WriteRecord]:
        """Every user-data write received, oldest first."""
        ...

    async def start_listener(self) -> None:
        """Listen again on the same port with the same state."""
        ...

    async def stop_listener(self) -> None:
        """Stop listening and drop every socket and session; stored state is kept."""
        ...

    def add_item(
        self, item_type: str = "Movie", name: str = "New Movie", **kwargs: Any
    ) -> LibraryItem:
        """Add an item and queue ``LibraryChanged``."""
        ...

    def remove_item(self, item_id: str) -> list[LibraryItem]:
        """Remove an item (and its children) and queue ``LibraryChanged``."""
        ...

    def move_item(self, item_id: str, new_path: str) -> LibraryItem:
        """Move a file: the old id disappears and a new id appears."""
        ...

    def save_state(self, path: str | None = None) -> str:
        """Write the library and user data to a state file and return where."""
        ...

    def save_user_data(
        self,
        user_id: str,
        item_id: str,
        reason: str = "UpdateUserData",
        *,
        played: bool | None = None,
        play_count: int | None = None,
        is_favorite: bool | None = None,
        rating: float | None = None,
        clear_rating: bool = False,
        last_played: datetime | None = None,
        clear_last_played: bool = False,
        position_ticks: int | None = None,
    ) -> UserData:
        """Change a user's data as a user of this server would; it echoes like any save."""
        ...

    def wipe_user_data(self, user_id: str | None = None) -> int:
        """Lose every user-data record of one user (every user when None) with no push."""
        ...

    def fail_next_writes(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` user-data writes with ``status`` and change nothing."""
        ...

    def set_latency(self, seconds: float) -> None:
        """Wait ``seconds`` before every HTTP answer."""
        ...

    async def drop_sockets(self) -> None:
        """Close every websocket."""
        ...

    def half_open_sockets(self) -> int:
        """Stop reading and writing on every open socket without closing it."""
        ...

    def set_debounce(self, seconds: float) -> None:
        """Change the UserDataChanged debounce."""
        ...

    def set_quick_connect(self, enabled: bool) -> None:
        """Turn Quick Connect on or off."""
        ...

    async def send_server_message(self, message_type: str, data: Any = None) -> int:
        """Broadcast a server message to every session; return how many got it."""
        ...

    def socket_count(self, user_id: str | None = None) -> int:
        """Count open sockets, or those whose session contains ``user_id``."""
        ...

    async def flush_now(self) -> None:
        """Send pending UserDataChanged and LibraryChanged messages without waiting."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a named background task owned (and cancelled on close) by the server."""
        ...


class EmulatorLike(ControlledServer, Protocol):
    """What the Jellyfin routes use (:mod:`jfsync.emulator.app` and its route groups).

    It includes :class:`ControlledServer` because the routes hand control requests on.
    """

    #: Writes still to fail with ``fail_writes_status`` (the routes count it down).
    fail_writes_left: int

    @property
    def fail_writes_status(self) -> int:
        """The status injected write failures answer with."""
        ...

    @property
    def latency_s(self) -> float:
        """Seconds to wait before every HTTP answer."""
        ...

    @property
    def port(self) -> int:
        """The listening port."""
        ...

    @property
    def server_version(self) -> ServerVersion:
        """The emulated version with its behaviour switches."""
        ...

    @property
    def tokens(self) -> dict[str, AccessToken]:
        """Access tokens by token."""
        ...

    @property
    def api_keys(self) -> dict[str, ApiKey]:
        """API keys by key."""
        ...

    @property
    def quick_connect_enabled(self) -> bool:
        """Tell whether Quick Connect is on."""
        ...

    @property
    def quick_connect(self) -> dict[str, dict[str, Any]]:
        """Pending Quick Connect requests by secret."""
        ...

    def user_by_name(self, name: str) -> EmuUser:
        """Return the user called ``name`` (case-insensitive); KeyError if none."""
        ...

    def login(
        self, user: EmuUser, client: str, device: str, device_id: str, app_version: str
    ) -> AccessToken:
        """Revoke this user+device's tokens and mint a new one."""
        ...

    def revoke_token(self, token: str) -> None:
        """Delete the token and end the sessions on its device."""
        ...

    def add_api_key(self, name: str) -> str:
        """Create an API key named ``name`` and return it."""
        ...

    def save(
        self,
        user: EmuUser,
        item: LibraryItem,
        change: Callable[[StoredUserData], None],
        reason: str,
    ) -> StoredUserData:
        """Apply a change to one user's data of one item, store it and queue the echo."""
        ...

    def user_data_dto(
        self,
        user_id: str,
        item: LibraryItem,
        *,
        item_id: str | None,
        with_recursive_count: bool = False,
    ) -> dict[str, Any]:
        """Build the current ``UserItemDataDto`` of (user, item) with the given ``ItemId``."""
        ...

    def folder_counts(self, user_id: str, item: LibraryItem) -> tuple[int, int] | None:
        """Return (leaves below, unplayed leaves below), or None for leaves and collections."""
        ...

    def record_request(self, record: RequestRecord) -> None:
        """Keep a request record and hand it to every registered observer."""
        ...

    def now(self) -> datetime:
        """The injected clock's wall time as an aware datetime."""
        ...
