"""The emulated server's state: version rules, users, tokens, API keys and stored user data.

Everything a request can read or change lives here, free of HTTP: the per-version behaviour
switches (fact sheet §1.2, §4.2, §4.3), user accounts and their access tokens (§8), API keys,
and the user-data store with its per-folder played counters (so folder ``UnplayedItemCount``
costs O(depth) per write, not O(library)). Records of requests and writes, read by tests and by
the spec checker, are defined here too.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jfsync.model import PlayState, UserData, datetime_to_s

#: Versions the emulator knows how to behave like.
SUPPORTED_VERSIONS = ("10.8.13", "10.9.11", "10.10.7", "10.11.11", "12.0.0")

#: The all-zero Guid Jellyfin writes for an unset non-nullable Guid (10.10 REST ``ItemId``).
EMPTY_GUID = "0" * 32

#: Rating at or above which Jellyfin derives ``Likes = true`` (``UserItemData.Likes``).
LIKES_THRESHOLD = 6.5


class ServerVersion:
    """One emulated Jellyfin version and the behaviour switches that depend on it."""

    def __init__(self, text: str) -> None:
        parts = tuple(int(p) for p in text.split(".")[:3])
        if len(parts) < 2:
            raise ValueError(f"not a Jellyfin version: {text!r}")
        self.text = text
        self.parts: tuple[int, ...] = parts

    def at_least(self, *parts: int) -> bool:
        """Tell whether this version is ``parts`` or newer."""
        return self.parts >= parts

    @property
    def has_user_items_routes(self) -> bool:
        """10.9 added ``/UserItems``, ``/UserFavoriteItems``, ``/UserPlayedItems`` (§4.1)."""
        return self.at_least(10, 9)

    @property
    def x_emby_authorization_first(self) -> bool:
        """Up to 10.10 ``X-Emby-Authorization`` is read before ``Authorization`` (§1.2)."""
        return not self.at_least(10, 11)

    @property
    def legacy_auth(self) -> bool:
        """v12 turns legacy auth off: ``api_key``, ``X-Emby-*`` headers, ``Emby`` scheme (§1.2)."""
        return not self.at_least(12)

    @property
    def api_key_socket_session(self) -> bool:
        """From 10.11 an API-key socket gets a session with an empty user (§1.2)."""
        return self.at_least(10, 11)

    @property
    def socket_device_id_query(self) -> bool:
        """Up to 10.10 the socket's ``deviceId`` query parameter names the session (§1.2)."""
        return not self.at_least(10, 11)

    @property
    def watchdog_closes(self) -> bool:
        """v12 disposes sockets lost by the KeepAlive watchdog; older ones only unwatch (§1.4)."""
        return self.at_least(12)

    @property
    def shares_user_data_by_key(self) -> bool:
        """Up to 10.10 user data lives under the item's user-data key, so items that share
        provider ids share one record (Corrections 10); from 10.11 it is per item."""
        return not self.at_least(10, 11)

    @property
    def quick_connect_user_id(self) -> bool:
        """``/QuickConnect/Authorize?userId=`` exists from 10.9 (§8.3)."""
        return self.at_least(10, 9)

    def rest_item_id(self, item_id: str) -> str | None:
        """Return the ``ItemId`` REST user-data answers carry (§4.2 end); None = omitted."""
        if self.at_least(10, 11):
            return item_id
        if self.at_least(10, 10):
            return EMPTY_GUID
        return None


def derived_id(*parts: str) -> str:
    """Return a stable 32-hex id derived from text (for server and user ids)."""
    digest = hashlib.md5("|".join(parts).encode(), usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest).hex


def new_token() -> str:
    """Return a fresh access token, 32 hex like Jellyfin's."""
    return secrets.token_hex(16)


@dataclass(slots=True)
class EmuUser:
    """A user account of the emulated server."""

    id: str
    name: str
    password: str = field(repr=False)
    is_admin: bool = False
    is_disabled: bool = False
    is_hidden: bool = False
    last_login_ms: int | None = None
    last_activity_ms: int | None = None


@dataclass(slots=True)
class AccessToken:
    """A user access token (a Jellyfin ``Device`` row)."""

    token: str = field(repr=False)
    user_id: str
    client: str
    device: str
    device_id: str
    version: str
    created_ms: int


@dataclass(slots=True)
class ApiKey:
    """An API key (``ApiKeys`` table): administrator rights, no user."""

    id: int
    token: str = field(repr=False)
    name: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request, as Jellyfin's ``AuthorizationInfo`` describes it."""

    token: str = field(repr=False)
    is_api_key: bool
    user: EmuUser | None
    client: str | None
    device: str | None
    device_id: str | None
    version: str | None

    @property
    def is_admin(self) -> bool:
        """API keys and administrator users may act for any user."""
        return self.is_api_key or (self.user is not None and self.user.is_admin)

    @property
    def user_id(self) -> str | None:
        """The caller's own user id; None for an API key."""
        return self.user.id if self.user is not None else None


@dataclass(slots=True)
class StoredUserData:
    """One user's data for one item, as the server stores it (``UserItemData``)."""

    rating: float | None = None
    played: bool = False
    play_count: int = 0
    is_favorite: bool = False
    last_played: datetime | None = None
    position_ticks: int = 0

    def copy(self) -> StoredUserData:
        """Return an independent copy."""
        return StoredUserData(
            self.rating,
            self.played,
            self.play_count,
            self.is_favorite,
            self.last_played,
            self.position_ticks,
        )

    @property
    def likes(self) -> bool | None:
        """Jellyfin's derived ``Likes``: rating >= 6.5, None without a rating."""
        return None if self.rating is None else self.rating >= LIKES_THRESHOLD

    @property
    def is_default(self) -> bool:
        """Tell whether this equals the data of an untouched item."""
        return self == StoredUserData()

    def to_domain(self) -> UserData:
        """Convert to jfsync's domain value (dates truncated to whole seconds)."""
        return UserData(
            favorite=self.is_favorite,
            rating=self.rating,
            play_state=PlayState(
                played=self.played,
                play_count=self.play_count,
                last_played_s=datetime_to_s(self.last_played),
                position_ticks=self.position_ticks,
            ),
        )


class UserDataStore:
    """Sparse per-user item data, with played counters per folder for ``UnplayedItemCount``."""

    def __init__(self, ancestors: Callable[[str], list[str]]) -> None:
        self._ancestors = ancestors
        self._data: dict[str, dict[str, StoredUserData]] = {}
        self._played_below: dict[str, dict[str, int]] = {}
        self._versions: dict[str, int] = {}

    def get(self, user_id: str, item_id: str) -> StoredUserData:
        """Return a copy of the stored data (the default when none is stored)."""
        found = self._data.get(user_id, {}).get(item_id)
        return found.copy() if found is not None else StoredUserData()

    def peek(self, user_id: str, item_id: str) -> StoredUserData | None:
        """Return the stored record itself, or None; callers must not mutate it."""
        return self._data.get(user_id, {}).get(item_id)

    def put(self, user_id: str, item_id: str, value: StoredUserData, *, is_leaf: bool) -> None:
        """Store ``value`` and keep the folder played counters right."""
        rows = self._data.setdefault(user_id, {})
        before = rows.get(item_id)
        was_played = before.played if before is not None else False
        if value.is_default:
            rows.pop(item_id, None)
        else:
            rows[item_id] = value.copy()
        if is_leaf and was_played != value.played:
            counters = self._played_below.setdefault(user_id, {})
            step = 1 if value.played else -1
            for folder in self._ancestors(item_id):
                counters[folder] = counters.get(folder, 0) + step
        self._versions[user_id] = self._versions.get(user_id, 0) + 1

    def wipe(self, user_id: str | None = None) -> int:
        """Forget the user data of one user (every user when None), silently; return how many
        records were dropped. This is a server that lost its data, not a user's edit."""
        users = [user_id] if user_id is not None else list(self._data)
        dropped = 0
        for uid in users:
            dropped += len(self._data.pop(uid, {}))
            self._played_below.pop(uid, None)
            self._versions[uid] = self._versions.get(uid, 0) + 1
        return dropped

    def forget_item(self, item_id: str, *, is_leaf: bool) -> dict[str, StoredUserData]:
        """Drop every user's data for an item (before it leaves the tree); return what it was."""
        dropped: dict[str, StoredUserData] = {}
        for user_id, rows in self._data.items():
            value = rows.get(item_id)
            if value is None:
                continue
            dropped[user_id] = value.copy()
            self.put(user_id, item_id, StoredUserData(), is_leaf=is_leaf)
        return dropped

    def played_below(self, user_id: str, folder_id: str) -> int:
        """Return how many played leaves lie below a folder for a user."""
        return self._played_below.get(user_id, {}).get(folder_id, 0)

    def user_ids(self) -> list[str]:
        """Return the users with any stored data."""
        return [u for u, rows in self._data.items() if rows]

    def items_of(self, user_id: str) -> list[str]:
        """Return the ids of items with non-default data for a user."""
        return list(self._data.get(user_id, {}))

    def version(self, user_id: str) -> int:
        """Return a counter that moves on every write for the user (for query caches)."""
        return self._versions.get(user_id, 0)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One HTTP request the emulator answered."""

    method: str
    path: str
    route: str | None
    is_legacy: bool
    query: dict[str, list[str]]
    client: str | None
    status: int
    time: float = 0.0
    is_websocket: bool = False
    is_control: bool = False


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One user-data write received over HTTP (favourite, played, rating or UserData routes)."""

    time: float
    method: str
    route: str
    user_id: str | None
    item_id: str | None
    body: dict[str, Any] | None
    client: str | None
    status: int = 200
    query: dict[str, list[str]] = field(default_factory=dict)


def utc_from_ms(ms: int) -> datetime:
    """Return epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
