"""The Emulator: one emulated Jellyfin server, its state, its save path and its listener.

:class:`Emulator` owns the library, the users and tokens, the user-data store and the socket
hub, and runs the aiohttp listener (:mod:`jfsync.emulator.app` holds the routes). Every
user-data change, from REST or from :meth:`Emulator.save_user_data`, goes through one save path
that echoes over websockets exactly as Jellyfin's ``UserDataSaved`` event does (fact sheet §2,
§3). Test controls (stop/start the listener, fail writes, latency, dropped or half-open
sockets, library changes) are methods here and routes in :mod:`jfsync.emulator.controls`.
The routes and the state file see this class only through the protocols of
:mod:`jfsync.emulator.view`, so nothing this module imports imports it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from jfsync.emulator import dto
from jfsync.emulator.app import JellyfinApi
from jfsync.emulator.library import Library, LibraryItem
from jfsync.emulator.persist import load_state, read_state, save_state
from jfsync.emulator.sockets import Debouncer, SocketHub
from jfsync.emulator.state import (
    SUPPORTED_VERSIONS,
    AccessToken,
    ApiKey,
    Caller,
    EmuUser,
    RequestRecord,
    ServerVersion,
    StoredUserData,
    UserDataStore,
    WriteRecord,
    derived_id,
    new_token,
    utc_from_ms,
)
from jfsync.ids import normalize_id
from jfsync.model import UserData
from jfsync.timing import Clock, SystemClock

logger = logging.getLogger(__name__)

#: ``ServerConfiguration.LibraryUpdateDuration`` default: LibraryChanged trailing debounce.
LIBRARY_DEBOUNCE_S = 30.0
#: Seconds a Quick Connect request stays valid (``QuickConnectManager.Timeout``, 10 minutes).
QUICK_CONNECT_TIMEOUT_S = 600.0
#: Reasons that never reach websockets (``UDCN`` filters PlaybackProgress).
_SILENT_REASONS = frozenset({"PlaybackProgress"})
#: How long in-flight requests may run when the listener stops.
_SHUTDOWN_TIMEOUT_S = 1.0


class Emulator:
    """An emulated Jellyfin server on loopback, for tests, benchmarks and the demo."""

    def __init__(
        self,
        api_key: str = "KEY",
        users: list[tuple[str, str]] | None = None,
        library_size: int = 200,
        seed: int = 1,
        server_version: str = "10.10.7",
        path_root: str = "/media",
        provider_ids: bool = True,
        debounce_s: float = 0.5,
        clock: Clock | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        server_name: str = "emulator",
        server_id: str | None = None,
        quick_connect: bool = True,
        library_debounce_s: float = LIBRARY_DEBOUNCE_S,
        state_file: str | None = None,
    ) -> None:
        saved = None
        self.state_file = state_file
        if state_file is not None and Path(state_file).exists():
            # A saved server comes back with its ids, library and user data.
            saved = read_state(state_file)
            server_id = str(saved["server_id"])
            path_root = str(saved["path_root"])
        if server_version not in SUPPORTED_VERSIONS:
            logger.warning("emulating unlisted version %s", server_version)
        self.clock: Clock = clock or SystemClock()
        self._version = ServerVersion(server_version)
        self.host = host
        self.port = port
        self.server_name = server_name
        self.server_id = (
            normalize_id(server_id)
            if server_id
            else derived_id("jfsync-emulator", server_name, str(seed), path_root)
        )
        self.quick_connect_enabled = quick_connect
        self.library = Library(path_root, provider_ids=provider_ids)
        if saved is None:
            self.library.generate(library_size, seed)
        self.store = UserDataStore(self.library.ancestors)
        self.users: dict[str, EmuUser] = {}
        accounts = users if users is not None else [("alice", "secret"), ("bob", "secret")]
        for n, (name, password) in enumerate(accounts):
            self.add_user(name, password, is_admin=(n == 0))
        self.tokens: dict[str, AccessToken] = {}
        self._token_serial = 0
        self.api_keys: dict[str, ApiKey] = {}
        self._next_key_id = 1
        self._add_api_key_token(api_key, "jfsync")
        self.quick_connect: dict[str, dict[str, Any]] = {}
        self.requests: list[RequestRecord] = []
        self.writes: list[WriteRecord] = []
        self.fail_writes_left = 0
        self.fail_writes_status = 500
        self.latency_s = 0.0
        self._orphans: dict[str, dict[str, StoredUserData]] = {}
        self.hub = SocketHub(
            clock=self.clock,
            version=self._version,
            debounce_s=debounce_s,
            build_dto=self.push_dto,
            parent_of=self._parent_of,
            server_name=server_name,
            sessions_data=self._sessions_data,
        )
        self._library_changes: dict[str, dict[str, None]] = _empty_library_changes()
        self._library_debouncer = Debouncer(
            self.clock, library_debounce_s, self._flush_library, f"emulator[{server_name}]-library"
        )
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._api: JellyfinApi | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        if saved is not None:
            load_state(self, saved)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (port 0 picks a free port, kept for later restarts)."""
        await self.start_listener()

    async def close(self) -> None:
        """Stop listening and every timer; idempotent."""
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.stop_listener()
        await self._library_debouncer.close()

    async def __aenter__(self) -> Self:
        """Start the emulator."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the emulator."""
        await self.close()

    async def start_listener(self) -> None:
        """Listen again on the same port with the same state (the server came back up)."""
        if self._runner is not None:
            return
        self.hub.reopen()
        self._api = JellyfinApi(self)
        runner = web.AppRunner(
            self._api.make_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        server = site._server
        if self.port == 0 and isinstance(server, asyncio.Server) and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])
        self._runner, self._site = runner, site
        logger.info(
            "[%s] emulating Jellyfin %s on %s", self.server_name, self._version.text, self.url
        )

    async def stop_listener(self) -> None:
        """Stop listening and drop every socket and session; stored state is kept."""
        runner, self._runner, self._site = self._runner, None, None
        await self.hub.close()
        # Sessions live in memory only: a restarted server has none.
        self.hub.sessions.clear()
        if runner is not None:
            await runner.cleanup()

    # --- identity ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, ``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def version(self) -> str:
        """The emulated version string, e.g. ``"10.10.7"``."""
        return self._version.text

    @property
    def server_version(self) -> ServerVersion:
        """The emulated version with its behaviour switches."""
        return self._version

    @property
    def is_listening(self) -> bool:
        """Tell whether the listener is up."""
        return self._runner is not None

    # --- users and credentials -----------------------------------------------------------

    def add_user(self, name: str, password: str = "", *, is_admin: bool = False) -> EmuUser:
        """Create a user; the id is derived from the server id and name."""
        user = EmuUser(
            id=derived_id(self.server_id, "user", name.lower()),
            name=name,
            password=password,
            is_admin=is_admin,
        )
        self.users[user.id] = user
        return user

    def user_id(self, name: str) -> str:
        """Return the id of the user called ``name`` (case-insensitive)."""
        return self.user_by_name(name).id

    def user_by_name(self, name: str) -> EmuUser:
        """Return the user called ``name`` (case-insensitive); KeyError if none."""
        for user in self.users.values():
            if user.name.lower() == name.lower():
                return user
        raise KeyError(name)

    def user_token(
        self, name: str, *, client: str = "emulator-test", device_id: str | None = None
    ) -> str:
        """Mint a valid access token for a user, as a login from ``device_id`` would.

        Without ``device_id`` every call logs in from a new device, so earlier tokens stay
        valid; with one, a second login from the same device revokes the first (as Jellyfin).
        """
        user = self.user_by_name(name)
        if device_id is None:
            self._token_serial += 1
            device_id = f"emulator-test-{user.name}-{self._token_serial}"
        return self.login(user, client, "emulator", device_id, "0.0.0").token

    def login(
        self, user: EmuUser, client: str, device: str, device_id: str, app_version: str
    ) -> AccessToken:
        """``SM.AuthenticateNewSessionInternal``: revoke this user+device's tokens, mint one."""
        for token in [t for t in self.tokens.values() if t.user_id == user.id]:
            if token.device_id == device_id:
                self.revoke_token(token.token)
        now = self.clock.wall_ms()
        access = AccessToken(new_token(), user.id, client, device, device_id, app_version, now)
        self.tokens[access.token] = access
        user.last_login_ms = user.last_activity_ms = now
        self.hub.log_session_activity(client, app_version, device_id, device, user.id)
        return access

    def revoke_token(self, token: str) -> None:
        """``SM.Logout``: delete the token and end the sessions on its device."""
        access = self.tokens.pop(token, None)
        if access is not None:
            self.hub.end_sessions_for_device(access.device_id)

    def add_api_key(self, name: str) -> str:
        """Create an API key named ``name`` and return it."""
        return self._add_api_key_token(new_token(), name)

    def _add_api_key_token(self, token: str, name: str) -> str:
        self.api_keys[token] = ApiKey(self._next_key_id, token, name, self.clock.wall_ms())
        self._next_key_id += 1
        return token

    # --- library -------------------------------------------------------------------------

    @property
    def items(self) -> list[LibraryItem]:
        """Every item below the collection folders (series, seasons, movies, episodes)."""
        return self.library.items()

    def leaf_items(self) -> list[LibraryItem]:
        """The playable items: movies and episodes."""
        return self.library.leaf_items()

    def item(self, item_id: str) -> LibraryItem:
        """Return one item by id (dashed or not); KeyError if unknown."""
        found = self.library.get(normalize_id(item_id))
        if found is None:
            raise KeyError(item_id)
        return found

    def add_item(
        self, item_type: str = "Movie", name: str = "New Movie", **kwargs: Any
    ) -> LibraryItem:
        """Add an item (see :meth:`Library.add_item`) and queue ``LibraryChanged``."""
        item = self.library.add_item(item_type, name, **kwargs)
        self._restore_orphans(item)
        self._library_changed("ItemsAdded", item.id, "FoldersAddedTo", item.parent_id)
        return item

    def remove_item(self, item_id: str) -> list[LibraryItem]:
        """Remove an item (and its children) and queue ``LibraryChanged``."""
        item = self.item(item_id)
        for gone in [item, *(self.library.get(i) for i in self.library.descendants(item.id))]:
            if gone is not None:
                self._orphan(gone)
        removed = self.library.remove_item(item.id)
        for gone in removed:
            self._library_changed("ItemsRemoved", gone.id, "FoldersRemovedFrom", gone.parent_id)
        return removed

    def move_item(self, item_id: str, new_path: str) -> LibraryItem:
        """Move a file: the old id disappears and a new id appears (ids derive from paths).

        User data follows the item only when its user-data key does not depend on the id
        (items with provider ids), as in Jellyfin.
        """
        item = self.item(item_id)
        self._orphan(item)
        moved = self.library.move_item(item.id, new_path)
        self._restore_orphans(moved)
        self._library_changed("ItemsRemoved", item.id, "FoldersRemovedFrom", item.parent_id)
        self._library_changed("ItemsAdded", moved.id, "FoldersAddedTo", moved.parent_id)
        return moved

    def _orphan(self, item: LibraryItem) -> None:
        if self._version.shares_user_data_by_key and self.library.same_key(item.id):
            # The record stays under its key with the other version: nothing to keep aside.
            self.store.forget_item(item.id, is_leaf=item.is_leaf)
            return
        dropped = self.store.forget_item(item.id, is_leaf=item.is_leaf)
        if dropped:
            self._orphans.setdefault(item.user_data_key, {}).update(dropped)

    def _restore_orphans(self, item: LibraryItem) -> None:
        """A new item finds the user data kept under its key: from a removed item with that
        key, or (10.8-10.10) the record it shares with another version still present."""
        for user_id, value in self._orphans.pop(item.user_data_key, {}).items():
            self.store.put(user_id, item.id, value, is_leaf=item.is_leaf)
        if not self._version.shares_user_data_by_key:
            return
        for other in self.library.same_key(item.id)[:1]:
            for user_id in self.store.user_ids():
                shared = self.store.peek(user_id, other)
                if shared is not None:
                    self.store.put(user_id, item.id, shared, is_leaf=True)

    def kept_user_data(self) -> dict[str, dict[str, StoredUserData]]:
        """User data kept for removed items, by user-data key then user id (copies)."""
        return {
            key: {user: value.copy() for user, value in rows.items()}
            for key, rows in self._orphans.items()
        }

    def restore_kept_user_data(self, kept: dict[str, dict[str, StoredUserData]]) -> None:
        """Replace the user data kept for removed items (loading a saved state)."""
        self._orphans = {key: dict(rows) for key, rows in kept.items()}

    def save_state(self, path: str | None = None) -> str:
        """Write the library and user data to ``path`` (default: the ``state_file``) and
        return where; a later ``Emulator(state_file=...)`` starts from it."""
        target = path or self.state_file
        if target is None:
            raise ValueError("no state file: pass a path or start the emulator with one")
        save_state(self, target)
        return target

    def _library_changed(
        self, kind: str, item_id: str, folder_kind: str, parent: str | None
    ) -> None:
        self._library_changes[kind][item_id] = None
        if parent is not None:
            self._library_changes[folder_kind][parent] = None
        self._library_debouncer.poke()

    async def _flush_library(self) -> None:
        changes, self._library_changes = self._library_changes, _empty_library_changes()
        data: dict[str, Any] = {key: list(ids) for key, ids in changes.items()}
        data["CollectionFolders"] = [f.id for f in self.library.collection_folders]
        data["IsEmpty"] = not any(changes.values())
        await self.hub.send_to_users("LibraryChanged", {u: data for u in self.users})

    # --- user data -----------------------------------------------------------------------

    def user_data(self, user_id: str, item_id: str) -> UserData:
        """Return the stored user data as jfsync's domain value."""
        return self.store.get(normalize_id(user_id), normalize_id(item_id)).to_domain()

    def stored_user_data(self, user_id: str, item_id: str) -> StoredUserData:
        """Return a copy of the stored user data record (exact dates)."""
        return self.store.get(normalize_id(user_id), normalize_id(item_id))

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
        user = self.users[normalize_id(user_id)]
        item = self.item(item_id)

        def change(data: StoredUserData) -> None:
            if position_ticks is not None:
                data.position_ticks = position_ticks
            if play_count is not None:
                data.play_count = play_count
            if is_favorite is not None:
                data.is_favorite = is_favorite
            if played is not None:
                data.played = played
            if last_played is not None:
                data.last_played = last_played
            if clear_last_played:
                data.last_played = None
            if rating is not None:
                data.rating = float(rating)
            if clear_rating:
                data.rating = None

        return self.save(user, item, change, reason).to_domain()

    def save(
        self,
        user: EmuUser,
        item: LibraryItem,
        change: Callable[[StoredUserData], None],
        reason: str,
    ) -> StoredUserData:
        """``UDM.SaveUserData``: apply, store, and (unless PlaybackProgress) queue the echo."""
        data = self.store.get(user.id, item.id)
        change(data)
        self.store.put(user.id, item.id, data, is_leaf=item.is_leaf)
        if self._version.shares_user_data_by_key:
            # One record under the shared key: the other versions change too, and only the
            # item written is queued for the push (Corrections 10).
            for other in self.library.same_key(item.id):
                self.store.put(user.id, other, data, is_leaf=True)
        if reason not in _SILENT_REASONS:
            self.hub.user_data_saved(user.id, item.id)
        return data

    def user_data_dto(
        self,
        user_id: str,
        item: LibraryItem,
        *,
        item_id: str | None,
        with_recursive_count: bool = False,
    ) -> dict[str, Any]:
        """Build the current ``UserItemDataDto`` of (user, item) with the given ``ItemId``.

        Series, seasons and folders get ``UnplayedItemCount`` and ``Played`` from their leaves
        (fact sheet Corrections 7); ``with_recursive_count`` (the item DTO asked for
        ``RecursiveItemCount``) adds ``PlayedPercentage``.
        """
        data = self.store.peek(user_id, item.id) or StoredUserData()
        counts = self.folder_counts(user_id, item)
        if counts is None:
            return dto.user_data_dto(data, item, item_id=item_id)
        total, unplayed = counts
        return dto.user_data_dto(
            data,
            item,
            item_id=item_id,
            unplayed=unplayed,
            recursive_count=total if with_recursive_count else None,
        )

    def folder_counts(self, user_id: str, item: LibraryItem) -> tuple[int, int] | None:
        """Return (leaves below, unplayed leaves below) for a user, or None when the item's
        played state does not come from leaves (a leaf or a collection folder)."""
        if not item.played_from_leaves:
            return None
        total = self.library.leaf_count(item.id)
        return total, total - self.store.played_below(user_id, item.id)

    def push_dto(self, user_id: str, item_id: str) -> dict[str, Any] | None:
        """The DTO a ``UserDataChanged`` push carries (real ItemId); None if the item is gone."""
        item = self.library.get(item_id)
        if item is None:
            return None
        return self.user_data_dto(user_id, item, item_id=item.id)

    def _sessions_data(self, viewer: Caller) -> list[dict[str, Any]]:
        """The ``Data`` of a ``Sessions`` message for ``viewer`` (§1.5)."""
        if self._api is None:
            return []
        sessions = self._api.sessions
        if not self._version.at_least(10, 9):
            # 10.8's listener sends every session to every subscriber.
            return [sessions.session_dto(s) for s in self.hub.sessions.values()]
        return [sessions.session_dto(s) for s in sessions.visible_sessions(viewer)]

    def _parent_of(self, item_id: str) -> str | None:
        item = self.library.get(item_id)
        return item.parent_id if item is not None else None

    # --- controls ------------------------------------------------------------------------

    def wipe_user_data(self, user_id: str | None = None) -> int:
        """Lose every user-data record of one user (every user when None) with no push.

        What a reinstall on the same config, a restore from an old backup or a failed database
        migration leaves: the same server and user ids, empty user data. Returns the records
        dropped.
        """
        return self.store.wipe(normalize_id(user_id) if user_id is not None else None)

    def fail_next_writes(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` user-data writes with ``status`` and change nothing."""
        self.fail_writes_left = n
        self.fail_writes_status = status

    def set_latency(self, seconds: float) -> None:
        """Wait ``seconds`` (on the injected clock) before every HTTP answer."""
        self.latency_s = max(0.0, seconds)

    async def drop_sockets(self) -> None:
        """Close every websocket; clients see a close frame."""
        await self.hub.drop_all()

    def half_open_sockets(self) -> int:
        """Stop reading and writing on every open socket without closing it."""
        return self.hub.half_open_all()

    def set_debounce(self, seconds: float) -> None:
        """Change the UserDataChanged debounce."""
        self.hub.debounce_s = seconds

    def set_library_debounce(self, seconds: float) -> None:
        """Change the LibraryChanged debounce."""
        self._library_debouncer.delay_s = seconds

    def set_quick_connect(self, enabled: bool) -> None:
        """Turn Quick Connect on or off."""
        self.quick_connect_enabled = enabled

    async def send_server_message(self, message_type: str, data: Any = None) -> int:
        """Broadcast a server message (e.g. ``ServerRestarting``) to every session."""
        return await self.hub.broadcast(message_type, data)

    def socket_count(self, user_id: str | None = None) -> int:
        """Count open sockets, or those whose session contains ``user_id``."""
        return self.hub.socket_count(normalize_id(user_id) if user_id else None)

    @property
    def pushes_pending(self) -> bool:
        """Tell whether a UserDataChanged flush is armed or being sent."""
        return self.hub.pushes_pending

    async def flush_now(self) -> None:
        """Send pending UserDataChanged and LibraryChanged messages without waiting."""
        await self.hub.flush_user_data()
        await self._flush_library()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a named background task owned (and cancelled on close) by the emulator."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- records -------------------------------------------------------------------------

    def record_request(self, record: RequestRecord) -> None:
        """Keep a request record and hand it to every registered observer."""
        self.requests.append(record)
        package = sys.modules.get("jfsync.emulator")
        for observer in list(getattr(package, "request_observers", ())):
            observer(self, record)

    def now(self) -> datetime:
        """The injected clock's wall time as an aware datetime."""
        return utc_from_ms(self.clock.wall_ms())


def _empty_library_changes() -> dict[str, dict[str, None]]:
    return {
        "FoldersAddedTo": {},
        "FoldersRemovedFrom": {},
        "ItemsAdded": {},
        "ItemsRemoved": {},
        "ItemsUpdated": {},
    }
