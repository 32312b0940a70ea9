"""The Jellyfin REST client: one :class:`JellyfinClient` per server, typed calls, mapped errors.

Every request carries ``Authorization: MediaBrowser Client="jfsync", Device, DeviceId, Version,
Token`` (the portable scheme from 10.8 to 12, fact sheet §1.2), has a timeout, and goes through
the aiohttp session passed in (one connection pool for the whole process). Failures become
:mod:`jfsync.errors` exceptions that name the server and the route *template* (never a URL with
its query, never a header), so keys and tokens cannot leak into messages or logs.

The write path follows the design ("Hard facts" 5): :meth:`JellyfinClient.apply_user_data`
sends what :func:`jfsync.jellyfin.writeplan.plan_write` plans: ``POST /UserItems/{id}/UserData``
with only the fields that change, ``DELETE /UserItems/{id}/Rating`` to clear a rating and
``DELETE /UserPlayedItems/{id}`` to unplay. ``POST /UserPlayedItems`` is never used: it bumps the
play count and recurses into folders.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote, urlsplit

import aiohttp
from pydantic import TypeAdapter, ValidationError

from jfsync import __version__
from jfsync.config import ServerConfig
from jfsync.errors import (
    AuthRejectedError,
    BadResponseError,
    RequestTimeoutError,
    UnreachableError,
    UnsupportedServerError,
    error_for_status,
)
from jfsync.ids import LEAF_ITEM_TYPES, normalize_id
from jfsync.jellyfin.lane import LaneFallback, WriteLane
from jfsync.jellyfin.messages import SessionInfo
from jfsync.jellyfin.wire import (
    AuthenticationResult,
    BaseItemDto,
    ListedItem,
    ListedPage,
    PublicSystemInfo,
    QueryResult,
    QuickConnectResult,
    SystemInfo,
    UserDto,
    UserItemDataDto,
    VirtualFolderInfo,
    listed_user_data,
)
from jfsync.jellyfin.writeplan import (
    CLEAR_RATING_ROUTE,
    MARK_UNPLAYED_ROUTE,
    USER_DATA_ROUTE,
    plan_write,
)
from jfsync.model import Register, UserData
from jfsync.timing import one_turn

logger = logging.getLogger(__name__)

#: Client name jfsync announces; the emulator and server logs show it.
CLIENT_NAME = "jfsync"
#: Device name jfsync announces.
DEVICE_NAME = "jfsync"
#: Oldest supported release: 10.9 added ``/UserItems/{id}/UserData`` (fact sheet §4.1).
MIN_SUPPORTED_VERSION = (10, 9)
#: Leaf item kinds listed by default, in a fixed order so requests are reproducible.
DEFAULT_ITEM_TYPES: tuple[str, ...] = tuple(sorted(LEAF_ITEM_TYPES))
#: Sort for paged scans. ``SortName`` is documented; ties are covered by the page overlap below.
SCAN_SORT_BY = "SortName,ProductionYear"
#: Items re-read at the start of every next page, so that up to this many removals before the
#: cursor during a scan cannot make it skip items (insertions only cause duplicates, dropped).
PAGE_OVERLAP = 16
#: Most ids per ``/Items?ids=`` request: 170 ids are 5.6 KiB of URL, below the 8 KiB that
#: Kestrel and common reverse proxies take for a request line. A pusher's batch
#: (:data:`~jfsync.sync.delivery.BATCH_SIZE`) is one request.
IDS_PER_REQUEST = 170
#: Items of a listing page validated per step, the event loop given back between steps: a
#: page of 1,000 items validated at once held the loop for 10-25 ms on a busy 2-core machine,
#: and every event, write and answer waited that long (about 1 ms per step here).
ITEMS_PER_STEP = 100
#: Longest error body text kept in an exception detail.
MAX_DETAIL_CHARS = 200

#: A URL path that needs no percent-encoding (a reverse proxy's prefix such as ``/jellyfin``).
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._~-]*")
_VERSION = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")
T = TypeVar("T")
#: An item of a listing page: whatever it is validated as, it has an ``id``.
_ListedT = TypeVar("_ListedT", BaseItemDto, ListedItem)


class QuickConnectUnavailableError(AuthRejectedError):
    """``/QuickConnect/Initiate`` answered 401: Quick Connect is disabled on the server."""


@functools.lru_cache(maxsize=256)
def auth_header(device_id: str, token: str | None = None) -> str:
    """Build the ``Authorization: MediaBrowser`` value; values are URL-encoded (§1.2).

    Cached: a client sends the same few headers thousands of times in a burst.
    """
    parts = [
        f'Client="{_enc(CLIENT_NAME)}"',
        f'Device="{_enc(DEVICE_NAME)}"',
        f'DeviceId="{_enc(device_id)}"',
        f'Version="{_enc(__version__)}"',
    ]
    if token is not None:
        parts.append(f'Token="{_enc(token)}"')
    return "MediaBrowser " + ", ".join(parts)


def _listing_query(
    user_id: str | None,
    recursive: bool,
    include_types: Sequence[str],
    fields: Sequence[str],
    filters: Sequence[str],
    parent_id: str | None,
) -> list[tuple[str, str]]:
    """The query of an ``/Items`` listing in the scan's stable order (:data:`SCAN_SORT_BY`),
    without images: what :meth:`JellyfinClient.iter_items` and
    :meth:`JellyfinClient.iter_user_data` send before the page and the ids."""
    base: list[tuple[str, str]] = []
    if user_id is not None:
        base.append(("userId", normalize_id(user_id)))
    base.append(("recursive", "true" if recursive else "false"))
    if include_types:
        base.append(("includeItemTypes", ",".join(include_types)))
    if fields:
        base.append(("fields", ",".join(fields)))
    if filters:
        base.append(("filters", ",".join(filters)))
    if parent_id is not None:
        base.append(("parentId", normalize_id(parent_id)))
    base += [("sortBy", SCAN_SORT_BY), ("sortOrder", "Ascending"), ("enableImages", "false")]
    return base


def _path_part(value: str) -> str:
    """``value`` encoded as one segment of a URL path (an id, the usual case, as it is)."""
    return value if value.isascii() and value.isalnum() else quote(value, safe="")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """Read ``"10.10.7"`` (or ``"12.0.0-rc5"``) as a tuple; None when it is not a version."""
    match = _VERSION.match(text)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


class JellyfinClient:
    """Typed REST access to one Jellyfin server with its admin API key."""

    @classmethod
    def for_server(
        cls, server: ServerConfig, *, session: aiohttp.ClientSession, device_id: str
    ) -> JellyfinClient:
        """The client of one configured server: its URL, admin API key, timeout and TLS check."""
        assert server.api_key is not None  # the config loader resolves api_key_file into it
        return cls(
            server.name,
            server.url,
            server.api_key.get_secret_value(),
            session=session,
            device_id=device_id,
            timeout_s=server.timeout_s,
            verify_tls=server.verify_tls,
        )

    def __init__(
        self,
        name: str,
        url: str,
        api_key: str,
        *,
        session: aiohttp.ClientSession,
        device_id: str,
        timeout_s: float = 10.0,
        verify_tls: bool = True,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.device_id = device_id
        self.timeout_s = timeout_s
        self._api_key = api_key
        self._session = session
        self._ssl = verify_tls
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._public: PublicSystemInfo | None = None
        parts = urlsplit(self.url)
        #: The URL needs no encoding (ASCII, no query, no fragment, nothing but plain path
        #: characters): the write route's URL is then written out whole (_user_item_raw).
        self._plain_url = (
            self.url.isascii()
            and not parts.query
            and not parts.fragment
            and _PLAIN_PATH.fullmatch(parts.path) is not None
        )
        api_auth = auth_header(device_id, api_key)
        self._headers = {"Authorization": api_auth, "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        # For messages: scheme, host and port only (a URL may carry user:password@).
        self.display_url = _origin(parts)
        #: The kept-alive lane of the writes (jellyfin/lane.py), for a plain http(s) URL
        #: without credentials in it; anything else writes through aiohttp.
        self._lane: WriteLane | None = None
        if (
            self._plain_url
            and parts.scheme in ("http", "https")
            and parts.hostname
            and parts.username is None
            and parts.password is None
        ):
            self._lane = WriteLane(
                name,
                scheme=parts.scheme,
                host=parts.hostname,
                port=parts.port,
                base_path=parts.path,
                headers=self._headers,
                display_url=self.display_url,
                timeout_s=timeout_s,
                verify_tls=verify_tls,
            )

    def __repr__(self) -> str:
        return f"JellyfinClient(name={self.name!r}, url={self.display_url!r})"

    async def close(self) -> None:
        """Close the write lane's connections (the aiohttp session is its owner's to close).

        Writes made after this go through aiohttp.
        """
        if self._lane is not None:
            await self._lane.close()

    # ------------------------------------------------------------------ server

    async def public_info(self) -> PublicSystemInfo:
        """``GET /System/Info/Public`` (anonymous): name, id and version of the server."""
        data = await self._call("GET", "/System/Info/Public", anonymous=True)
        info = self._parse(PublicSystemInfo, data, "/System/Info/Public")
        self._public = info
        return info

    async def server_version(self) -> tuple[int, int, int]:
        """Return the server version as a tuple, asking the server the first time."""
        info = self._public or await self.public_info()
        version = parse_version(info.version or "")
        if version is None:
            raise BadResponseError(
                self.name, "/System/Info/Public", f"field Version: not a version ({info.version!r})"
            )
        return version

    async def ensure_supported(self) -> PublicSystemInfo:
        """Fetch public info and raise UnsupportedServerError for servers older than 10.9."""
        info = await self.public_info()
        version = await self.server_version()
        if version[:2] < MIN_SUPPORTED_VERSION:
            raise UnsupportedServerError(
                self.name,
                f"Jellyfin {info.version} has no user-data write route; jfsync needs 10.9 or "
                "newer. Upgrade the server.",
            )
        return info

    async def system_info(self) -> SystemInfo:
        """``GET /System/Info``: succeeds only with a valid key, so it proves the key works."""
        data = await self._call("GET", "/System/Info")
        return self._parse(SystemInfo, data, "/System/Info")

    # ------------------------------------------------------------------ users

    async def users(self) -> list[UserDto]:
        """``GET /Users``: every account, with its policy flags."""
        data = await self._call("GET", "/Users")
        return self._parse(_USER_LIST, data, "/Users")

    async def user(self, user_id: str) -> UserDto:
        """``GET /Users/{userId}``: one account."""
        data = await self._call("GET", "/Users/{userId}", path={"userId": normalize_id(user_id)})
        return self._parse(UserDto, data, "/Users/{userId}")

    async def current_user(self, token: str | None = None) -> UserDto:
        """``GET /Users/Me`` with ``token`` (default: the API key, which answers 400)."""
        data = await self._call("GET", "/Users/Me", token=token)
        return self._parse(UserDto, data, "/Users/Me")

    async def sessions(self) -> list[SessionInfo]:
        """``GET /Sessions``: every session with what it plays (the API key sees them all)."""
        data = await self._call("GET", "/Sessions")
        return self._parse(_SESSION_LIST, data, "/Sessions")

    async def libraries(self) -> list[VirtualFolderInfo]:
        """``GET /Library/VirtualFolders`` (admin): the server's libraries and their folders."""
        data = await self._call("GET", "/Library/VirtualFolders")
        return self._parse(_LIBRARY_LIST, data, "/Library/VirtualFolders")

    # ------------------------------------------------------------------ items

    async def iter_items(
        self,
        user_id: str | None,
        *,
        include_types: Sequence[str] = DEFAULT_ITEM_TYPES,
        fields: Sequence[str] = ("Path", "ProviderIds"),
        filters: Sequence[str] = (),
        ids: Iterable[str] = (),
        parent_id: str | None = None,
        page_size: int | Callable[[], int] = 1000,
        recursive: bool = True,
        pause: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[BaseItemDto]:
        """Yield every matching item once, paging ``GET /Items`` with a stable sort.

        With ``user_id`` each item carries that user's ``UserData``. Pages overlap by
        ``PAGE_OVERLAP`` items and items already yielded are skipped, so items added or removed
        during the scan neither repeat nor (for up to that many removals per page) go missing;
        the end is the first short page, not ``TotalRecordCount``, which may change mid-scan.
        A page is validated :data:`ITEMS_PER_STEP` items at a time; ``pause`` (default: one
        turn of the event loop) is awaited between two steps and before every page but the
        first. ``page_size`` may be a callable, asked before each page.
        """
        base = _listing_query(user_id, recursive, include_types, fields, filters, parent_id)
        wanted = [normalize_id(i) for i in ids]
        seen: set[str] = set()
        if not wanted:
            async for item in self._scan(base, page_size, seen, pause):
                yield item
            return
        for start in range(0, len(wanted), IDS_PER_REQUEST):
            chunk = wanted[start : start + IDS_PER_REQUEST]
            chunked = [*base, ("ids", ",".join(chunk))]
            async for item in self._scan(chunked, page_size, seen, pause):
                yield item

    async def user_data_of(self, user_id: str, item_ids: Iterable[str]) -> dict[str, UserData]:
        """One user's data of some items, by item id (normalised); items the user cannot see,
        or listed without user data, are left out.

        The listing :meth:`iter_items` makes for ``ids`` (no fields, no type filter, sub-items
        included), :data:`IDS_PER_REQUEST` ids a request, but each answer is validated in one
        pass for the ids and user data only: the pusher reads its peer's state of every batch
        it writes this way, ten thousand items for a bulk action.
        """
        # No type filter, no fields: every listed item, sub-items included. No sort either:
        # the answer is taken by id, and a sort is work for the server (an ORDER BY in
        # Jellyfin's query) that an id lookup does not need.
        base = [("userId", normalize_id(user_id)), ("recursive", "true")]
        wanted = [normalize_id(i) for i in item_ids]
        route = "/Items"
        found: dict[str, UserData] = {}
        for chunk in even_chunks(wanted, IDS_PER_REQUEST):
            query = [
                *base,
                ("ids", ",".join(chunk)),
                ("startIndex", "0"),
                ("limit", str(len(chunk))),
                ("enableTotalRecordCount", "false"),
                ("enableImages", "false"),
            ]
            raw = await self._call("GET", route, query=query, decode=False)
            for item in self._parse_json(_USER_DATA_PAGE, raw, route).get("Items", ()):
                data = item.get("UserData")
                if data is not None:
                    found[item["Id"]] = listed_user_data(data)
        return found

    async def iter_user_data(
        self,
        user_id: str,
        *,
        filters: Sequence[str] = (),
        parent_id: str | None = None,
        include_types: Sequence[str] = DEFAULT_ITEM_TYPES,
        page_size: int | Callable[[], int] = 1000,
        pause: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[tuple[str, UserData]]:
        """Yield (item id, the user's data) of every item :meth:`iter_items` would list with
        these arguments, once each; items listed without user data are left out.

        No fields are asked for and each page is validated in one pass for the ids and user
        data only (``ListedItem``, as :meth:`user_data_of`): a catch-up needs nothing
        else of a server whose items the library index maps, and validating whole
        ``BaseItemDto`` pages was most of its work on the event loop. ``page_size`` may be a
        callable, asked before each page (a catch-up pages smaller while live events flow:
        one page of 100 items is validated in about 0.3 ms); ``pause`` (default: one turn of
        the event loop) is awaited before every page but the first.
        """
        base = _listing_query(user_id, True, include_types, (), filters, parent_id)
        route = "/Items"

        async def parse(raw: bytes, first: bool) -> list[ListedItem]:
            return self._parse_json(_USER_DATA_PAGE, raw, route).get("Items", [])

        async for item in self._paged(base, page_size, set(), pause or one_turn, parse, _listed_id):
            data = item.get("UserData")
            if data is not None:
                yield item["Id"], listed_user_data(data)

    # ------------------------------------------------------------------ user data

    async def get_user_data(self, user_id: str, item_id: str) -> UserItemDataDto:
        """``GET /UserItems/{itemId}/UserData?userId=``: one user's data for one item."""
        return await self._user_item("GET", USER_DATA_ROUTE, user_id, item_id)

    async def update_user_data(
        self, user_id: str, item_id: str, body: Mapping[str, Any]
    ) -> UserItemDataDto:
        """``POST /UserItems/{itemId}/UserData?userId=`` with exactly the fields to set."""
        return await self._user_item("POST", USER_DATA_ROUTE, user_id, item_id, body=dict(body))

    async def clear_rating(self, user_id: str, item_id: str) -> UserItemDataDto:
        """``DELETE /UserItems/{itemId}/Rating?userId=``: set the rating to none."""
        return await self._user_item("DELETE", CLEAR_RATING_ROUTE, user_id, item_id)

    async def mark_unplayed(self, user_id: str, item_id: str) -> UserItemDataDto:
        """``DELETE /UserPlayedItems/{itemId}?userId=``: played, count, position and date reset."""
        return await self._user_item("DELETE", MARK_UNPLAYED_ROUTE, user_id, item_id)

    async def _user_item(
        self,
        method: str,
        route: str,
        user_id: str,
        item_id: str,
        *,
        body: Mapping[str, Any] | None = None,
        raw_body: bytes | None = None,
    ) -> UserItemDataDto:
        """Call a ``{itemId}`` route for ``userId`` that answers a ``UserItemDataDto``."""
        raw = await self._user_item_raw(
            method, route, user_id, item_id, body=body, raw_body=raw_body
        )
        return self._parse_json(UserItemDataDto, raw, route)

    async def _user_item_raw(
        self,
        method: str,
        route: str,
        user_id: str,
        item_id: str,
        *,
        body: Mapping[str, Any] | None = None,
        raw_body: bytes | None = None,
    ) -> bytes:
        """:meth:`_user_item`'s call, answering the raw body.

        The pusher sends thousands of these in a burst. A write (not a read) goes through the
        client's write lane (:class:`jfsync.jellyfin.lane.WriteLane`: kept-alive connections
        and prebuilt request bytes, about a third of aiohttp's CPU per request) while it is
        usable; a write the lane cannot carry, and every read, goes through aiohttp, its URL
        written out whole (ids are 32 hex digits once normalised, so nothing in it needs
        encoding) with the client's own headers, made once.
        """
        if not self._plain_url:
            # A server URL that needs encoding (rare): the general path.
            raw: bytes = await self._call(
                method,
                route,
                path={"itemId": normalize_id(item_id)},
                query=[("userId", normalize_id(user_id))],
                body=body,
                raw_body=raw_body,
                decode=False,
            )
            return raw
        if body is not None and raw_body is None:
            raw_body = json.dumps(dict(body)).encode()
        path = f"{route.replace('{itemId}', normalize_id(item_id))}?userId={normalize_id(user_id)}"
        lane = self._lane
        if lane is not None and method != "GET" and lane.usable:
            try:
                status, raw = await lane.send(method, route, path, raw_body)
            except LaneFallback:
                pass  # an answer the lane cannot read: aiohttp sends it as any other request
            else:
                return self._answer(method, route, status, raw)
        headers = self._json_headers if raw_body is not None else self._headers
        return await self._exchange(method, route, self.url + path, (), raw_body, None, headers)

    async def apply_user_data(
        self,
        user_id: str,
        item_id: str,
        desired: UserData,
        current: UserData,
        registers: frozenset[Register],
    ) -> UserData:
        """Make ``registers`` of the target hold ``desired``; return the state the server reports.

        Sends the requests of :func:`jfsync.jellyfin.writeplan.plan_write` in order: nothing
        when the target already holds them (dates compare at 1 s), a DELETE for a rating or a
        last played date going to none, then one POST of only the registers that still differ.
        """
        result = current
        for request in plan_write(current, desired, registers).requests:
            answer = await self._user_item(
                request.method, request.route, user_id, item_id, raw_body=request.body
            )
            result = answer.to_user_data()
        return result

    async def write_user_data(
        self,
        user_id: str,
        item_id: str,
        desired: UserData,
        current: UserData,
        registers: frozenset[Register],
    ) -> None:
        """Send what :meth:`apply_user_data` sends, without decoding the server's answers.

        For a writer that records the state it meant to write, not the one reported (the
        pusher, thousands of times in a burst): every answer must still be a success whose
        body is a JSON object (a proxy's page answering 200 is an error), but its fields are
        not read.
        """
        for request in plan_write(current, desired, registers).requests:
            raw = await self._user_item_raw(
                request.method, request.route, user_id, item_id, raw_body=request.body
            )
            if raw.lstrip()[:1] != b"{":
                problem = "the body is empty" if not raw.strip() else "the body is not JSON"
                raise BadResponseError(self.name, request.route, problem)

    # ------------------------------------------------------------------ tokens

    async def quick_connect_enabled(self) -> bool:
        """``GET /QuickConnect/Enabled``: whether the server allows Quick Connect."""
        data = await self._call("GET", "/QuickConnect/Enabled")
        return self._parse(_BOOL, data, "/QuickConnect/Enabled")

    async def mint_user_token(self, user_id: str, device_id: str) -> str:
        """Get a token for ``user_id`` on ``device_id`` through admin-authorised Quick Connect.

        Initiate as a fresh device would (that device id, no token), authorise the code for the
        user with the admin key (``userId`` exists from 10.9), then exchange the secret for the
        user's access token (fact sheet §8.3). Raises QuickConnectUnavailableError when the
        server has Quick Connect disabled.
        """
        user_id = normalize_id(user_id)
        version = await self.server_version()
        if version[:2] < MIN_SUPPORTED_VERSION:
            raise UnsupportedServerError(
                self.name, "Quick Connect cannot authorise other users before Jellyfin 10.9"
            )
        route = "/QuickConnect/Initiate"
        try:
            data = await self._call("POST", route, anonymous=True, device_id=device_id)
        except AuthRejectedError as err:
            raise QuickConnectUnavailableError(
                self.name, "POST", route, err.status, "Quick Connect is disabled on this server"
            ) from err
        pending = self._parse(QuickConnectResult, data, route)
        route = "/QuickConnect/Authorize"
        data = await self._call("POST", route, query=[("code", pending.code), ("userId", user_id)])
        if not self._parse(_BOOL, data, route):
            raise BadResponseError(self.name, route, "the server did not authorise the code")
        route = "/Users/AuthenticateWithQuickConnect"
        data = await self._call(
            "POST", route, anonymous=True, device_id=device_id, body={"Secret": pending.secret}
        )
        result = self._parse(AuthenticationResult, data, route)
        return self._check_login(result, route, user_id)

    async def authenticate_by_name(
        self, username: str, password: str, device_id: str
    ) -> tuple[str, str]:
        """``POST /Users/AuthenticateByName``: log in; return (user id, access token).

        Logging in again with the same user and device id revokes the previous token (§8.2).
        """
        route = "/Users/AuthenticateByName"
        data = await self._call(
            "POST",
            route,
            anonymous=True,
            device_id=device_id,
            body={"Username": username, "Pw": password},
        )
        result = self._parse(AuthenticationResult, data, route)
        token = self._check_login(result, route, None)
        assert result.user is not None
        return result.user.id, token

    # ------------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        route: str,
        *,
        path: Mapping[str, str] | None = None,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        raw_body: bytes | None = None,
        anonymous: bool = False,
        token: str | None = None,
        device_id: str | None = None,
        decode: bool = True,
    ) -> Any:
        """Send one request; return the decoded JSON body (None when empty).

        With ``decode=False`` the raw body is returned instead (for :meth:`_parse_json`).
        ``raw_body`` is a JSON body already encoded (sent instead of ``body``).

        Authenticates with ``token``, else the API key, unless ``anonymous``. ``device_id``
        overrides the client's own (Quick Connect and logins act as the user's device).
        """
        header = auth_header(
            device_id or self.device_id, None if anonymous else (token or self._api_key)
        )
        url = self.url + route.format(**{k: _path_part(v) for k, v in (path or {}).items()})
        headers = {"Authorization": header, "Accept": "application/json"}
        if raw_body is not None:
            headers["Content-Type"] = "application/json"
        json_body = None if body is None or raw_body is not None else dict(body)
        raw = await self._exchange(method, route, url, query, raw_body, json_body, headers)
        if not decode:
            return raw
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise BadResponseError(self.name, route, "the body is not JSON") from None

    async def _exchange(
        self,
        method: str,
        route: str,
        url: str,
        query: Sequence[tuple[str, str]],
        raw_body: bytes | None,
        json_body: dict[str, Any] | None,
        headers: Mapping[str, str],
    ) -> bytes:
        """Send one request to ``url``; return the body of a success, raise the mapped error
        (naming ``route``, the template, never the URL) for anything else."""
        # An aiohttp error about an answer (ClientResponseError) holds the request's headers,
        # the API key among them, in its repr: it is not chained to the error raised.
        unchained: UnreachableError | None = None
        try:
            async with self._session.request(
                method,
                url,
                params=list(query) or None,
                data=raw_body,
                json=json_body,
                headers=headers,
                timeout=self._timeout,
                ssl=self._ssl,
                # A redirected POST or DELETE would be sent on as a GET (301, 302, 303), which
                # answers the item's data: the write would count as made without being made.
                allow_redirects=method == "GET",
            ) as response:
                status = response.status
                raw = await response.read()
                location = response.headers.get("Location", "")
        except TimeoutError as err:
            raise RequestTimeoutError(
                self.name, f"{method} {route}: no answer within {self.timeout_s:g} s"
            ) from err
        except aiohttp.ClientError as err:
            unreachable = UnreachableError(
                self.name, f"{method} {route}: cannot reach {self.display_url} ({_reason(err)})"
            )
            if not isinstance(err, aiohttp.ClientResponseError):
                raise unreachable from err
            unchained = unreachable
        if unchained is not None:
            raise unchained  # outside the except block: no __context__ either
        return self._answer(method, route, status, raw, location)

    def _answer(
        self, method: str, route: str, status: int, raw: bytes, location: str = ""
    ) -> bytes:
        """The body of a success; the mapped error (naming ``route``) for a redirect (never
        followed by a write: see :func:`_redirected`) or an error status. For an answer
        through aiohttp or through the write lane alike."""
        logger.debug("[%s] %s %s -> %d", self.name, method, route, status)
        if 300 <= status < 400:
            raise BadResponseError(self.name, route, _redirected(method, status, location))
        if status >= 400:
            raise error_for_status(self.name, method, route, status, self._detail(raw))
        return raw

    def _parse(self, kind: type[T] | TypeAdapter[T], data: Any, route: str) -> T:
        """Validate ``data`` as ``kind``; raise BadResponseError naming the failing field."""
        adapter = kind if isinstance(kind, TypeAdapter) else _adapter(kind)
        try:
            return adapter.validate_python(data)
        except ValidationError as err:
            first = err.errors(include_url=False, include_input=False)[0]
            where = _loc_text(first["loc"]) or "(body)"
            message = str(first["msg"]).removeprefix("Value error, ")
            more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
            raise BadResponseError(self.name, route, f"field {where}: {message}{more}") from None

    def _parse_json(self, kind: type[T] | TypeAdapter[T], raw: bytes, route: str) -> T:
        """Validate a raw JSON body as ``kind`` (one pass, no intermediate objects)."""
        if not raw.strip():
            raise BadResponseError(self.name, route, "the body is empty")
        adapter = kind if isinstance(kind, TypeAdapter) else _adapter(kind)
        try:
            return adapter.validate_json(raw)
        except ValidationError as err:
            if err.errors(include_url=False)[0]["type"] == "json_invalid":
                raise BadResponseError(self.name, route, "the body is not JSON") from None
        # Not the expected shape: the same message as for any other body.
        return self._parse(kind, json.loads(raw), route)

    def _load_json(self, raw: bytes, route: str) -> Any:
        """Decode a raw JSON body into Python values (C speed, nothing validated yet)."""
        if not raw.strip():
            raise BadResponseError(self.name, route, "the body is empty")
        try:
            return json.loads(raw)
        except ValueError:
            raise BadResponseError(self.name, route, "the body is not JSON") from None

    def _detail(self, raw: bytes) -> str:
        """Short, secret-free text of an error body (ProblemDetails title/detail or text)."""
        text = raw.decode("utf-8", "replace").strip()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        if isinstance(data, dict):
            text = " ".join(str(data[k]) for k in ("title", "detail") if data.get(k))
        if self._api_key:
            text = text.replace(self._api_key, "***")
        text = " ".join(text.split())
        if len(text) > MAX_DETAIL_CHARS:
            text = text[: MAX_DETAIL_CHARS - 3] + "..."
        return text

    async def _scan(
        self,
        base: list[tuple[str, str]],
        page_size: int | Callable[[], int],
        seen: set[str],
        pause: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[BaseItemDto]:
        """Every item of a paged listing once, each page validated as ``BaseItemDto`` a
        step of :data:`ITEMS_PER_STEP` at a time."""
        route = "/Items"
        between = pause or one_turn

        async def parse(raw: bytes, first: bool) -> list[BaseItemDto]:
            page = self._parse(_PAGE, self._load_json(raw, route), route)
            if first and page.total_record_count is not None:
                logger.debug("[%s] scan of %d items", self.name, page.total_record_count)
            # The whole page is validated before any item of it is yielded (a bad item fails
            # the page, as before), a step at a time so the loop is never held for long.
            items: list[BaseItemDto] = []
            for step in range(0, len(page.items), ITEMS_PER_STEP):
                if step:
                    await between()
                items += self._parse_items(page.items[step : step + ITEMS_PER_STEP], step, route)
            return items

        async for item in self._paged(base, page_size, seen, between, parse, _item_id):
            yield item

    async def _paged(
        self,
        base: list[tuple[str, str]],
        page_size: int | Callable[[], int],
        seen: set[str],
        between: Callable[[], Awaitable[None]],
        parse: Callable[[bytes, bool], Awaitable[list[_ListedT]]],
        ident: Callable[[_ListedT], str],
    ) -> AsyncIterator[_ListedT]:
        """Page ``GET /Items`` with ``base``: ``page_size`` items a request (a callable is asked
        before each page), ``between`` awaited before every page but the first, each page
        turned into items by ``parse(raw body, first page)``; items whose id (``ident``) is
        in ``seen`` are skipped
        and the others added to it. Pages overlap by :data:`PAGE_OVERLAP` items (a quarter of
        a small page at most); the end is the first short page."""
        route = "/Items"
        start = 0
        first = True
        while True:
            if not first:
                await between()
            size = page_size() if callable(page_size) else page_size
            query = [
                *base,
                ("startIndex", str(start)),
                ("limit", str(size)),
                ("enableTotalRecordCount", "true" if first else "false"),
            ]
            raw = await self._call("GET", route, query=query, decode=False)
            items = await parse(raw, first)
            first = False
            for item in items:
                key = ident(item)
                if key not in seen:
                    seen.add(key)
                    yield item
            if len(items) < size:
                return
            start += size - min(PAGE_OVERLAP, max(0, size // 4))

    def _parse_items(self, raw_items: list[Any], offset: int, route: str) -> list[BaseItemDto]:
        """Validate some items of a listing page (decoded JSON), the first being ``offset``;
        errors name the field as in the whole page (``Items[103].Id``)."""
        try:
            return _ITEM_LIST.validate_python(raw_items)
        except ValidationError as err:
            first = err.errors(include_url=False, include_input=False)[0]
            loc = list(first["loc"])
            if loc and isinstance(loc[0], int):
                loc[0] += offset
            where = _loc_text(["Items", *loc])
            message = str(first["msg"]).removeprefix("Value error, ")
            more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
            raise BadResponseError(self.name, route, f"field {where}: {message}{more}") from None

    def _check_login(self, result: AuthenticationResult, route: str, user_id: str | None) -> str:
        if not result.access_token:
            raise BadResponseError(self.name, route, "field AccessToken: missing")
        if result.user is None:
            raise BadResponseError(self.name, route, "field User: missing")
        if user_id is not None and result.user.id != user_id:
            raise BadResponseError(
                self.name, route, "field User.Id: the token belongs to another user"
            )
        return result.access_token


_USER_LIST: TypeAdapter[list[UserDto]] = TypeAdapter(list[UserDto])
_SESSION_LIST: TypeAdapter[list[SessionInfo]] = TypeAdapter(list[SessionInfo])
_LIBRARY_LIST: TypeAdapter[list[VirtualFolderInfo]] = TypeAdapter(list[VirtualFolderInfo])
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)
#: A listing page with its items still decoded JSON (validated a step at a time by _scan).
_PAGE: TypeAdapter[QueryResult[Any]] = TypeAdapter(QueryResult[Any])
_ITEM_LIST: TypeAdapter[list[BaseItemDto]] = TypeAdapter(list[BaseItemDto])
#: A listing page read for its items' user data only (validated whole, in one pass).
_USER_DATA_PAGE: TypeAdapter[ListedPage] = TypeAdapter(ListedPage)


_ADAPTERS: dict[object, Any] = {}


def _adapter(kind: type[T]) -> TypeAdapter[T]:
    adapter: TypeAdapter[T] | None = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def _item_id(item: BaseItemDto) -> str:
    return item.id


def _listed_id(item: ListedItem) -> str:
    return item["Id"]


def even_chunks(values: list[str], most: int) -> Iterator[list[str]]:
    """``values`` in as few chunks of at most ``most`` as can be, of about equal sizes (500
    ids at 170 a request: 3 requests of 167, not 170, 170, 160)."""
    if not values:
        return
    count = -(-len(values) // most)
    size = -(-len(values) // count)
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _enc(value: str) -> str:
    # Jellyfin URL-decodes header values; encode only what would break the quoting.
    return quote(value, safe=" -_.~/:+=@!*()'")


def _loc_text(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _origin(parts: SplitResult) -> str:
    """``scheme://host[:port]`` of a URL: what messages show of it (a URL may carry
    ``user:password@``, a path with a token in it, a query)."""
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _redirected(method: str, status: int, location: str) -> str:
    """Why a write answered by a redirect was not made, and the fix (the target's scheme, host
    and port only: a Location may carry a path with tokens or a user name)."""
    try:
        parts = urlsplit(location)
        where = _origin(parts) if parts.scheme and parts.hostname else "another path of this server"
    except ValueError:  # a port that is not one
        where = "an address it does not spell out right"
    return (
        f"the server answered {method} with {status}, a redirect to {where}; jfsync does not "
        "send a write on to another address: set this server's url to the address it "
        "redirects to"
    )


def _reason(err: BaseException) -> str:
    """Name a transport failure without its URL (``str`` of some aiohttp errors holds one)."""
    os_error = getattr(err, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    return type(err).__name__
