"""The emulated server's HTTP surface: authentication, routing and the REST handlers.

One catch-all aiohttp handler matches routes case-insensitively (ASP.NET routing is), parses
the ``Authorization: MediaBrowser …`` header and the token sources in the order the emulated
version reads them (fact sheet §1.2), applies the status rules of §4.3, records every request
(with its OpenAPI path template) and every user-data write, and hands websocket upgrades on any
path to :class:`jfsync.emulator.sockets.SocketHub`. Handlers implement §4 (user data), §5
(items), §6-8 (users, system, credentials) and §3 (playback reporting).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime
from typing import Any

from aiohttp import web

from jfsync.emulator import dto
from jfsync.emulator.browse import BrowseApi
from jfsync.emulator.controls import handle_control
from jfsync.emulator.http import (
    Ctx,
    HttpError,
    Route,
    guid_or_none,
    json_response,
    no_content,
    parse_auth_header,
    parse_date,
    parse_guid,
)
from jfsync.emulator.library import LibraryItem
from jfsync.emulator.query import ITEM_FILTERS, ItemQuery, ItemQueryEngine
from jfsync.emulator.session_routes import SessionApi
from jfsync.emulator.sockets import Session
from jfsync.emulator.state import (
    AccessToken,
    Caller,
    EmuUser,
    RequestRecord,
    StoredUserData,
    WriteRecord,
)
from jfsync.emulator.view import EmulatorLike
from jfsync.ids import InvalidIdError, normalize_id

logger = logging.getLogger(__name__)

#: Prefix of the test-control routes (real Jellyfin has nothing there).
CONTROL_PREFIX = "/__emulator__"

#: Query parameters that carry tokens; their values are redacted in records.
_TOKEN_PARAMS = frozenset({"apikey", "api_key"})
#: What a redacted value reads as.
REDACTED = "<redacted>"

#: ``ServerConfiguration`` playback thresholds (§3).
MIN_RESUME_PCT = 5.0
MAX_RESUME_PCT = 90.0
MIN_RESUME_DURATION_S = 300.0
_TICKS_PER_SECOND = 10_000_000

#: ``BaseItemKind`` names, matched case-insensitively.
_ITEM_KINDS = {
    k.lower(): k
    for k in [
        "AggregateFolder",
        "Audio",
        "AudioBook",
        "BasePluginFolder",
        "Book",
        "BoxSet",
        "Channel",
        "ChannelFolderItem",
        "CollectionFolder",
        "Episode",
        "Folder",
        "Genre",
        "ManualPlaylistsFolder",
        "Movie",
        "LiveTvChannel",
        "LiveTvProgram",
        "MusicAlbum",
        "MusicArtist",
        "MusicGenre",
        "MusicVideo",
        "Person",
        "Photo",
        "PhotoAlbum",
        "Playlist",
        "PlaylistsFolder",
        "Program",
        "Recording",
        "Season",
        "Series",
        "Studio",
        "Trailer",
        "TvChannel",
        "TvProgram",
        "UserRootFolder",
        "UserView",
        "Video",
        "Year",
    ]
}
#: ``ItemSortBy`` names (10.10 and 10.11 together), matched case-insensitively.
_SORT_KEYS = frozenset(
    k.lower()
    for k in [
        "Default",
        "AiredEpisodeOrder",
        "Album",
        "AlbumArtist",
        "Artist",
        "DateCreated",
        "OfficialRating",
        "DatePlayed",
        "PremiereDate",
        "StartDate",
        "SortName",
        "Name",
        "Random",
        "Runtime",
        "CommunityRating",
        "ProductionYear",
        "PlayCount",
        "CriticRating",
        "IsFolder",
        "IsUnplayed",
        "IsPlayed",
        "SeriesSortName",
        "VideoBitRate",
        "AirTime",
        "Studio",
        "IsFavoriteOrLiked",
        "DateLastContentAdded",
        "SeriesDatePlayed",
        "ParentIndexNumber",
        "IndexNumber",
        "SimilarityScore",
        "SearchScore",
    ]
)
#: Every field single-item reads return (``new DtoOptions()`` asks for all of them).
_ALL_FIELDS = frozenset(
    {
        "path",
        "providerids",
        "datecreated",
        "sortname",
        "parentid",
        "childcount",
        "recursiveitemcount",
    }
)
#: ``UpdateUserItemDataDto`` members and their JSON types.
_UPDATE_FIELDS: dict[str, str] = {
    "rating": "number",
    "playedpercentage": "number",
    "unplayeditemcount": "int",
    "playbackpositionticks": "int",
    "playcount": "int",
    "isfavorite": "bool",
    "likes": "bool",
    "lastplayeddate": "date",
    "played": "bool",
    "key": "string",
    "itemid": "string",
}


class JellyfinApi:
    """The routes of one emulated server (built per listener start)."""

    def __init__(self, emu: EmulatorLike) -> None:
        self.emu = emu
        self.version = emu.server_version
        self.queries = ItemQueryEngine(emu.library, emu.store, emu.server_id)
        self.browse = BrowseApi(self)
        self.sessions = SessionApi(self)
        self.routes = self._build_routes()

    def make_app(self) -> web.Application:
        """Build the aiohttp application with the catch-all dispatcher."""
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    # --- dispatch ------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Answer one HTTP request (or upgrade it to a websocket)."""
        emu = self.emu
        path = request.path
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            query.setdefault(key.lower(), []).append(value)
        raw_query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            # Records keep parameter names as sent but never a token's value.
            shown = REDACTED if key.lower() in _TOKEN_PARAMS else value
            raw_query.setdefault(key, []).append(shown)
        if path.lower().startswith(CONTROL_PREFIX):
            answer = await handle_control(emu, request, path[len(CONTROL_PREFIX) :])
            self._record(request, None, False, raw_query, None, answer.status, control=True)
            return answer
        if emu.latency_s > 0:
            await emu.clock.sleep(emu.latency_s)
        auth, caller, token = self._authenticate(request, query)
        client = auth.get("Client")
        if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, raw_query, caller, token, client)
        route, params, allowed = self._match(request.method, path)
        ctx: Ctx | None = None
        response: web.StreamResponse
        try:
            if route is None:
                # ASP.NET routing: no endpoint is a bare 404 (405 for another method).
                raise HttpError(405 if allowed else 404, bare=True)
            ctx = Ctx(request, params, query, caller, auth, route)
            if route.auth != "anon" and caller is None:
                raise HttpError(401)
            if route.auth == "admin" and not (caller is not None and caller.is_admin):
                raise HttpError(403)
            if route.write and emu.fail_writes_left > 0:
                emu.fail_writes_left -= 1
                await self._read_body_leniently(ctx)
                raise HttpError(emu.fail_writes_status, "injected failure")
            response = await route.handler(ctx)
        except HttpError as err:
            response = err.response()
        except Exception:
            logger.exception("[%s] %s %s failed", emu.server_name, request.method, path)
            response = HttpError(500).response()
        if route is not None and route.write and ctx is not None:
            await self._record_write(ctx, response.status, client, raw_query)
        template = route.template if route is not None and route.documented else None
        legacy = route is not None and not route.documented
        self._record(request, template, legacy, raw_query, client, response.status)
        return response

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        allowed = False
        for route in self.routes:
            found = route.regex.match(path)
            if found is None:
                continue
            if route.method == method:
                return route, {k: v for k, v in found.groupdict().items()}, True
            allowed = True
        return None, {}, allowed

    def _record(
        self,
        request: web.Request,
        template: str | None,
        legacy: bool,
        query: dict[str, list[str]],
        client: str | None,
        status: int,
        *,
        control: bool = False,
        websocket: bool = False,
    ) -> None:
        self.emu.record_request(
            RequestRecord(
                method=request.method,
                path=request.path,
                route=template,
                is_legacy=legacy,
                query=query,
                client=client,
                status=status,
                time=self.emu.clock.monotonic(),
                is_websocket=websocket,
                is_control=control,
            )
        )

    async def _record_write(
        self, ctx: Ctx, status: int, client: str | None, query: dict[str, list[str]]
    ) -> None:
        user_id = ctx.write_user_id
        if user_id is None:
            raw = ctx.params.get("userId") or ctx.first("userId")
            try:
                user_id = normalize_id(raw) if raw else ctx.caller.user_id if ctx.caller else None
            except InvalidIdError:
                user_id = None
        item_id = ctx.write_item_id
        if item_id is None and ctx.params.get("itemId"):
            try:
                item_id = normalize_id(ctx.params["itemId"])
            except InvalidIdError:
                item_id = None
        body = ctx.body if isinstance(ctx.body, dict) else None
        self.emu.writes.append(
            WriteRecord(
                time=self.emu.clock.monotonic(),
                method=ctx.request.method,
                route=ctx.route.template,
                user_id=user_id,
                item_id=item_id,
                body=body,
                client=client,
                status=status,
                query=query,
            )
        )

    # --- authentication ------------------------------------------------------------------

    def _authenticate(
        self, request: web.Request, query: dict[str, list[str]]
    ) -> tuple[dict[str, str], Caller | None, AccessToken | None]:
        legacy = self.version.legacy_auth
        headers = request.headers
        names = ["Authorization"]
        if self.version.x_emby_authorization_first:
            names = ["X-Emby-Authorization", "Authorization"]
        elif legacy:
            names.append("X-Emby-Authorization")
        auth: dict[str, str] = {}
        for name in names:
            raw = headers.get(name)
            if raw:
                auth = parse_auth_header(raw, allow_emby=legacy) or {}
                break
        token = auth.get("Token")
        if not token and legacy:
            token = headers.get("X-Emby-Token") or headers.get("X-MediaBrowser-Token")
        if not token:
            token = next(iter(query.get("apikey", [])), None)
        if not token and legacy:
            token = next(iter(query.get("api_key", [])), None)
        if not token:
            return auth, None, None
        emu = self.emu
        access = emu.tokens.get(token)
        if access is not None:
            user = emu.users.get(access.user_id)
            if user is None or user.is_disabled:
                return auth, None, None
            user.last_activity_ms = emu.clock.wall_ms()
            caller = Caller(
                token=token,
                is_api_key=False,
                user=user,
                client=auth.get("Client") or access.client,
                device=auth.get("Device") or access.device,
                device_id=auth.get("DeviceId") or access.device_id,
                version=auth.get("Version") or access.version,
            )
            return auth, caller, access
        key = emu.api_keys.get(token)
        if key is not None:
            caller = Caller(
                token=token,
                is_api_key=True,
                user=None,
                client=key.name,
                device=auth.get("Device") or emu.server_name,
                device_id=auth.get("DeviceId") or emu.server_id,
                version=auth.get("Version") or self.version.text,
            )
            return auth, caller, None
        return auth, None, None

    async def _websocket(
        self,
        request: web.Request,
        query: dict[str, list[str]],
        caller: Caller | None,
        token: AccessToken | None,
        client: str | None,
    ) -> web.StreamResponse:
        if caller is None:
            # AuthService throws SecurityException; ExceptionMiddleware maps it to 403.
            self._record(request, None, False, query, client, 403, websocket=True)
            return HttpError(403).response()
        self._record(request, None, False, query, client, 101, websocket=True)
        return await self.emu.hub.serve(request, caller, token.client if token else None)

    # --- shared helpers ------------------------------------------------------------------

    def _user_for(self, ctx: Ctx, user_text: str | None) -> EmuUser:
        """``ReqH.GetUserId`` then the user lookup: 400, 403 or 404 as Jellyfin answers."""
        caller = ctx.caller
        assert caller is not None
        if user_text:
            user_id = parse_guid(user_text)
            if user_id != caller.user_id and not caller.is_admin:
                raise HttpError(403, "Forbidden")
        elif caller.user is not None:
            user_id = caller.user.id
        elif self.version.at_least(10, 9):
            # An API key's own user id is Guid.Empty, and GetUserById throws ArgumentException
            # for it: 400 (Corrections 1).
            raise HttpError(400, "userId is required with an API key")
        else:
            raise HttpError(404, "User not found")
        user = self.emu.users.get(user_id)
        if user is None:
            raise HttpError(404, "User not found")
        ctx.write_user_id = user.id
        return user

    def _user_and_item(self, ctx: Ctx) -> tuple[EmuUser, LibraryItem]:
        """The target user and item of a user-data route, checked in Jellyfin's order: a
        malformed id is 400 (model binding), then the user (400/403/404), then the item (404)
        - a non-admin naming another user gets 403 before any 404 for the item."""
        parse_guid(ctx.params["itemId"])
        user = self._user_for(ctx, self._path_or_query_user(ctx))
        return user, self._item_for(ctx, ctx.params["itemId"])

    def _item_for(self, ctx: Ctx, item_text: str) -> LibraryItem:
        item_id = parse_guid(item_text)
        ctx.write_item_id = item_id
        item = self.emu.library.get(item_id)
        if item is None:
            raise HttpError(404, "Item not found")
        return item

    def _user_data_response(self, user: EmuUser, item: LibraryItem) -> web.Response:
        item_id = self.version.rest_item_id(item.id)
        return json_response(self.emu.user_data_dto(user.id, item, item_id=item_id))

    async def _read_body_leniently(self, ctx: Ctx) -> None:
        if ctx.request.can_read_body:
            text = await ctx.request.text()
            try:
                ctx.body = json.loads(text) if text else None
            except ValueError:
                ctx.body = None

    async def _json_body(self, ctx: Ctx, *, required: bool = True) -> dict[str, Any]:
        """Read a JSON object body: 400 when missing or malformed, 415 without a JSON type."""
        text = await ctx.request.text() if ctx.request.can_read_body else ""
        if not text.strip():
            if required:
                raise HttpError(400, "A non-empty request body is required.")
            return {}
        ctype = ctx.request.content_type.lower()
        if not (ctype in ("application/json", "text/json") or ctype.endswith("+json")):
            raise HttpError(415)
        try:
            body = json.loads(text)
        except ValueError:
            raise HttpError(400, "The JSON value could not be converted.") from None
        ctx.body = body
        if not isinstance(body, dict):
            raise HttpError(400, "The JSON value could not be converted.")
        return body

    def _path_or_query_user(self, ctx: Ctx) -> str | None:
        return ctx.params.get("userId") or ctx.first("userId")

    # --- routes --------------------------------------------------------------------------

    def _build_routes(self) -> list[Route]:
        v = self.version
        new = v.has_user_items_routes
        # Legacy /Users/{userId}/... aliases are documented only in 10.8's OpenAPI file.
        legacy_doc = not new
        b = self.browse
        r: list[Route] = [
            Route("GET", "/Shows/NextUp", b.next_up),
            Route("GET", "/Shows/{seriesId}/Episodes", b.episodes),
            Route("GET", "/Shows/{seriesId}/Seasons", b.seasons),
            Route("GET", "/Users/{userId}/Items/Resume", b.resume, documented=legacy_doc),
            Route("GET", "/Users/{userId}/Items/Latest", b.latest, documented=legacy_doc),
            Route("GET", "/Items/Counts", b.counts),
            Route("GET", "/Items/Filters", b.filters),
            Route("GET", "/Library/MediaFolders", b.media_folders, "admin"),
            Route("GET", "/Library/VirtualFolders", b.virtual_folders, "admin"),
            Route("GET", "/Items/{itemId}/Ancestors", b.ancestors),
            Route("GET", "/Items/{itemId}/Similar", b.similar),
            Route("GET", "/Artists", b.artists),
            Route("GET", "/System/Info/Public", self.system_info_public, "anon"),
            Route("GET", "/System/Ping", self.ping, "anon"),
            Route("POST", "/System/Ping", self.ping, "anon"),
            Route("GET", "/System/Info", self.system_info),
            Route("GET", "/Users/Me", self.users_me),
            Route("POST", "/Users/AuthenticateByName", self.authenticate_by_name, "anon"),
            Route("POST", "/Users/AuthenticateWithQuickConnect", self.authenticate_qc, "anon"),
            Route("GET", "/Users/Public", self.users_public, "anon"),
            Route("GET", "/Users", self.users_list),
            Route("GET", "/QuickConnect/Enabled", self.qc_enabled, "anon"),
            Route("POST" if new else "GET", "/QuickConnect/Initiate", self.qc_initiate, "anon"),
            Route("GET", "/QuickConnect/Connect", self.qc_connect, "anon"),
            Route("POST", "/QuickConnect/Authorize", self.qc_authorize),
            Route("GET", "/Auth/Keys", self.keys_list, "admin"),
            Route("POST", "/Auth/Keys", self.keys_create, "admin"),
            Route("DELETE", "/Auth/Keys/{key}", self.keys_delete, "admin"),
            Route("GET", "/Items", self.items_list),
            Route("GET", "/Sessions", self.sessions.sessions_list),
            Route("POST", "/Sessions/Capabilities", self.sessions.capabilities),
            Route("POST", "/Sessions/Capabilities/Full", self.sessions.capabilities_full),
            Route("POST", "/Sessions/Logout", self.sessions.logout),
            Route("POST", "/Sessions/Playing/Ping", self.sessions.ping),
            Route("POST", "/Sessions/Playing", self.playing_start),
            Route("POST", "/Sessions/Playing/Progress", self.playing_progress),
            Route("POST", "/Sessions/Playing/Stopped", self.playing_stopped),
            Route("POST", "/Sessions/{sessionId}/User/{userId}", self.session_add_user),
            Route("DELETE", "/Sessions/{sessionId}/User/{userId}", self.session_remove_user),
        ]
        sa = self.sessions
        playing = "/PlayingItems/{itemId}"
        if new:
            r += [
                Route("POST", playing, sa.playing_item_start),
                Route("DELETE", playing, sa.playing_item_stopped),
                Route("POST", playing + "/Progress", sa.playing_item_progress),
            ]
        r += [
            Route(
                "POST", "/Users/{userId}" + playing, sa.playing_item_start, documented=legacy_doc
            ),
            Route(
                "DELETE",
                "/Users/{userId}" + playing,
                sa.playing_item_stopped,
                documented=legacy_doc,
            ),
            Route(
                "POST",
                "/Users/{userId}" + playing + "/Progress",
                sa.playing_item_progress,
                documented=legacy_doc,
            ),
        ]
        if new:
            r += [
                Route("GET", "/UserItems/Resume", b.resume),
                Route("GET", "/Items/Latest", b.latest),
                Route("GET", "/Items/Suggestions", b.suggestions),
                Route("GET", "/Items/Root", b.root),
                Route("GET", "/UserViews", self.user_views),
                Route("GET", "/Items/{itemId}", self.item_get),
                Route("GET", "/UserItems/{itemId}/UserData", self.user_data_get),
                Route("POST", "/UserItems/{itemId}/UserData", self.user_data_post, write=True),
                Route("POST", "/UserFavoriteItems/{itemId}", self.favorite_add, write=True),
                Route("DELETE", "/UserFavoriteItems/{itemId}", self.favorite_remove, write=True),
                Route("POST", "/UserPlayedItems/{itemId}", self.played_add, write=True),
                Route("DELETE", "/UserPlayedItems/{itemId}", self.played_remove, write=True),
                Route("POST", "/UserItems/{itemId}/Rating", self.rating_set, write=True),
                Route("DELETE", "/UserItems/{itemId}/Rating", self.rating_clear, write=True),
                Route(
                    "GET",
                    "/Users/{userId}/Items/{itemId}/UserData",
                    self.user_data_get,
                    documented=False,
                ),
                Route(
                    "POST",
                    "/Users/{userId}/Items/{itemId}/UserData",
                    self.user_data_post,
                    documented=False,
                    write=True,
                ),
            ]
        r += [
            Route("GET", "/Users/{userId}/Views", self.user_views, documented=legacy_doc),
            Route("GET", "/Users/{userId}/Items", self.items_list, documented=legacy_doc),
            Route("GET", "/Users/{userId}/Items/{itemId}", self.item_get, documented=legacy_doc),
            Route(
                "POST",
                "/Users/{userId}/FavoriteItems/{itemId}",
                self.favorite_add,
                documented=legacy_doc,
                write=True,
            ),
            Route(
                "DELETE",
                "/Users/{userId}/FavoriteItems/{itemId}",
                self.favorite_remove,
                documented=legacy_doc,
                write=True,
            ),
            Route(
                "POST",
                "/Users/{userId}/PlayedItems/{itemId}",
                self.played_add,
                documented=legacy_doc,
                write=True,
            ),
            Route(
                "DELETE",
                "/Users/{userId}/PlayedItems/{itemId}",
                self.played_remove,
                documented=legacy_doc,
                write=True,
            ),
            Route(
                "POST",
                "/Users/{userId}/Items/{itemId}/Rating",
                self.rating_set,
                documented=legacy_doc,
                write=True,
            ),
            Route(
                "DELETE",
                "/Users/{userId}/Items/{itemId}/Rating",
                self.rating_clear,
                documented=legacy_doc,
                write=True,
            ),
            Route("GET", "/Users/{userId}", self.user_get),
        ]
        return r

    # --- system --------------------------------------------------------------------------

    async def system_info_public(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /System/Info/Public`` (anonymous)."""
        emu = self.emu
        return json_response(
            dto.public_system_info(
                local_address=emu.url,
                server_name=emu.server_name,
                version=self.version,
                server_id=emu.server_id,
            )
        )

    async def ping(self, ctx: Ctx) -> web.StreamResponse:
        """``GET|POST /System/Ping`` (anonymous): the product name as a JSON string."""
        return json_response(dto.PRODUCT_NAME)

    async def system_info(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /System/Info``."""
        emu = self.emu
        return json_response(
            dto.system_info(
                local_address=emu.url,
                server_name=emu.server_name,
                version=self.version,
                server_id=emu.server_id,
                port=emu.port,
            )
        )

    # --- users ---------------------------------------------------------------------------

    def _user_dto(self, user: EmuUser) -> dict[str, Any]:
        emu = self.emu
        return dto.user_dto(
            user, server_id=emu.server_id, server_name=emu.server_name, version=self.version
        )

    async def users_list(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Users``: every user, for any authenticated caller (§6.1)."""
        hidden = ctx.boolean("isHidden")
        disabled = ctx.boolean("isDisabled")
        users = [
            u
            for u in self.emu.users.values()
            if (hidden is None or u.is_hidden == hidden)
            and (disabled is None or u.is_disabled == disabled)
        ]
        return json_response([self._user_dto(u) for u in users])

    async def users_public(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Users/Public``: Jellyfin lists none unless configured to; so do we."""
        return json_response([])

    async def user_get(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Users/{userId}``."""
        user = self.emu.users.get(parse_guid(ctx.params["userId"]))
        if user is None:
            raise HttpError(404, "User not found")
        return json_response(self._user_dto(user))

    async def users_me(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Users/Me``: user tokens only (400 for an API key)."""
        assert ctx.caller is not None
        if ctx.caller.user is None:
            raise HttpError(400, "Current user not found")
        return json_response(self._user_dto(ctx.caller.user))

    def _auth_result(self, user: EmuUser, access: AccessToken) -> dict[str, Any]:
        emu = self.emu
        session = emu.hub.sessions.get(access.client + access.device_id)
        result: dict[str, Any] = {"User": self._user_dto(user)}
        if session is not None:
            result["SessionInfo"] = self._session_dto(session)
        result["AccessToken"] = access.token
        result["ServerId"] = emu.server_id
        return result

    def _require_device_fields(self, ctx: Ctx) -> tuple[str, str, str, str]:
        values = tuple(ctx.auth.get(k, "") for k in ("Client", "Device", "DeviceId", "Version"))
        if not all(values):
            # SM.AuthenticateNewSessionInternal: ArgumentException -> 400.
            raise HttpError(400, "Client, Device, DeviceId and Version are required")
        return values[0], values[1], values[2], values[3]

    async def authenticate_by_name(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Users/AuthenticateByName`` (§8.2)."""
        client, device, device_id, app_version = self._require_device_fields(ctx)
        body = {k.lower(): v for k, v in (await self._json_body(ctx)).items()}
        ctx.body = None  # never keep passwords in records
        name = body.get("username")
        password = body.get("pw")
        if password is None and not self.version.at_least(10, 9):
            password = body.get("password")
        if not isinstance(name, str):
            raise HttpError(400, "Username is required")
        try:
            user = self.emu.user_by_name(name)
        except KeyError:
            raise HttpError(401) from None
        if user.is_disabled or (password or "") != user.password:
            raise HttpError(401)
        access = self.emu.login(user, client, device, device_id, app_version)
        return json_response(self._auth_result(user, access))

    # --- quick connect -------------------------------------------------------------------

    def _qc_active(self) -> None:
        if not self.emu.quick_connect_enabled:
            # QuickConnectManager.AssertActive throws AuthenticationException -> 401.
            raise HttpError(401, "Quick connect is not enabled on this server")
        now = self.emu.clock.wall_ms()
        limit_ms = 600_000
        for secret, entry in list(self.emu.quick_connect.items()):
            if now - entry["added_ms"] > limit_ms:
                del self.emu.quick_connect[secret]

    def _qc_dto(self, entry: dict[str, Any]) -> dict[str, Any]:
        return dto.quick_connect_dto(
            secret=entry["secret"],
            code=entry["code"],
            authenticated=entry["user_id"] is not None,
            device_id=entry["device_id"],
            device_name=entry["device"],
            app_name=entry["client"],
            app_version=entry["version"],
            added_ms=entry["added_ms"],
        )

    async def qc_enabled(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /QuickConnect/Enabled``."""
        return json_response(self.emu.quick_connect_enabled)

    async def qc_initiate(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /QuickConnect/Initiate``: needs Client, Device, DeviceId and Version."""
        self._qc_active()
        client, device, device_id, app_version = self._require_device_fields(ctx)
        codes = {e["code"] for e in self.emu.quick_connect.values()}
        code = f"{secrets.randbelow(1_000_000):06d}"
        while code in codes:
            code = f"{secrets.randbelow(1_000_000):06d}"
        entry: dict[str, Any] = {
            "secret": secrets.token_hex(32),
            "code": code,
            "client": client,
            "device": device,
            "device_id": device_id,
            "version": app_version,
            "added_ms": self.emu.clock.wall_ms(),
            "user_id": None,
            "access": None,
        }
        self.emu.quick_connect[entry["secret"]] = entry
        return json_response(self._qc_dto(entry))

    async def qc_connect(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /QuickConnect/Connect?secret=``: the request's state."""
        self._qc_active()
        entry = self.emu.quick_connect.get(ctx.first("secret") or "")
        if entry is None:
            raise HttpError(404, "Unknown secret")
        return json_response(self._qc_dto(entry))

    async def qc_authorize(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /QuickConnect/Authorize?code=&userId=`` (``userId`` from 10.9; §8.3)."""
        self._qc_active()
        code = ctx.first("code")
        if not code:
            raise HttpError(400, "code is required")
        if self.version.quick_connect_user_id:
            user = self._user_for(ctx, ctx.first("userId"))
        else:
            assert ctx.caller is not None
            if ctx.caller.user is None:
                raise HttpError(404, "User not found")
            user = ctx.caller.user
        entry = next((e for e in self.emu.quick_connect.values() if e["code"] == code), None)
        if entry is None:
            raise HttpError(404, "Unknown quick connect code")
        if entry["user_id"] is not None:
            # QuickConnectManager.AuthorizeRequest: InvalidOperationException -> 500.
            raise HttpError(500, "Request is already authorized")
        # The token and its session are minted here (AuthenticateDirect), which also logs out
        # that user's earlier token on this device and closes its socket (Corrections 5).
        access = self.emu.login(
            user, entry["client"], entry["device"], entry["device_id"], entry["version"]
        )
        entry["user_id"] = user.id
        entry["access"] = access
        return json_response(True)

    async def authenticate_qc(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Users/AuthenticateWithQuickConnect`` body ``{"Secret": …}``: the result
        minted at Authorize; repeatable with the same secret; 404 before Authorize."""
        self._qc_active()
        body = {k.lower(): v for k, v in (await self._json_body(ctx)).items()}
        ctx.body = None
        secret = body.get("secret")
        if not isinstance(secret, str) or not secret:
            raise HttpError(400, "Secret is required")
        entry = self.emu.quick_connect.get(secret)
        if entry is None or entry["user_id"] is None:
            raise HttpError(404, "Unknown or unauthorized secret")
        user = self.emu.users.get(entry["user_id"])
        access = entry["access"]
        if user is None or not isinstance(access, AccessToken):
            raise HttpError(401)
        return json_response(self._auth_result(user, access))

    # --- API keys ------------------------------------------------------------------------

    async def keys_list(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Auth/Keys`` (§8.1)."""
        rows = [dto.api_key_dto(k) for k in self.emu.api_keys.values()]
        return json_response({"Items": rows, "TotalRecordCount": len(rows), "StartIndex": 0})

    async def keys_create(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Auth/Keys?app=`` → 204."""
        app = ctx.first("app")
        if not app:
            raise HttpError(400, "app is required")
        self.emu.add_api_key(app)
        return no_content()

    async def keys_delete(self, ctx: Ctx) -> web.StreamResponse:
        """``DELETE /Auth/Keys/{key}`` → 204."""
        self.emu.api_keys.pop(ctx.params["key"], None)
        return no_content()

    # --- items ---------------------------------------------------------------------------

    def _items_user(self, ctx: Ctx) -> EmuUser | None:
        text = self._path_or_query_user(ctx)
        if text:
            return self._user_for(ctx, text)
        assert ctx.caller is not None
        return ctx.caller.user

    def _item_query(self, ctx: Ctx, user: EmuUser | None) -> ItemQuery:
        # CommaDelimitedCollectionModelBinder drops values its converter cannot parse
        # (unknown enum names, malformed Guids) and binds the rest: 200, never 400.
        include, exclude = self.kinds(ctx)
        filters = frozenset(f.lower() for f in ctx.array("filters")) & ITEM_FILTERS
        sort_by = tuple(s.lower() for s in ctx.array("sortBy") if s.lower() in _SORT_KEYS)
        sort_order = tuple(
            s.lower() for s in ctx.array("sortOrder") if s.lower() in ("ascending", "descending")
        )
        ids = tuple(i for i in (guid_or_none(x) for x in ctx.array("ids")) if i is not None)
        has_provider = tuple(
            (provider, flag)
            for provider, name in (
                ("Imdb", "hasImdbId"),
                ("Tmdb", "hasTmdbId"),
                ("Tvdb", "hasTvdbId"),
            )
            if (flag := ctx.boolean(name)) is not None
        )
        return ItemQuery(
            user_id=user.id if user is not None else None,
            parent_id=ctx.guid("parentId"),
            recursive=bool(ctx.boolean("recursive", False)),
            include_types=include,
            exclude_types=exclude,
            filters=filters,
            is_played=ctx.boolean("isPlayed"),
            is_favorite=ctx.boolean("isFavorite"),
            ids=ids,
            sort_by=sort_by,
            sort_order=sort_order,
            search_term=ctx.first("searchTerm") or None,
            has_provider=has_provider,
        )

    def _item_dto(
        self,
        item: LibraryItem,
        user: EmuUser | None,
        fields: frozenset[str],
        *,
        enable_user_data: bool = True,
        enable_images: bool = True,
    ) -> dict[str, Any]:
        emu = self.emu
        user_data = None
        recursive_count = None
        if user is not None and enable_user_data:
            asked = "recursiveitemcount" in fields
            user_data = emu.user_data_dto(
                user.id,
                item,
                item_id=self.version.rest_item_id(item.id),
                with_recursive_count=asked,
            )
            counts = emu.folder_counts(user.id, item)
            if asked and counts is not None:
                recursive_count = counts[0]
        child_count = len(emu.library.children(item.id)) if item.is_folder else None
        return dto.item_dto(
            item,
            server_id=emu.server_id,
            fields=fields,
            user_data=user_data,
            enable_images=enable_images,
            child_count=child_count,
            recursive_item_count=recursive_count,
        )

    # --- helpers shared with the browsing routes -----------------------------------------

    def paging(self, ctx: Ctx) -> tuple[int, int | None]:
        """``StartIndex`` and ``Limit``; 400 when negative."""
        start = self.number(ctx, "startIndex") or 0
        limit = self.number(ctx, "limit")
        if start < 0 or (limit is not None and limit < 0):
            raise HttpError(400, "startIndex and limit must not be negative")
        return start, limit

    def number(self, ctx: Ctx, name: str) -> int | None:
        """An integer query parameter (400 when it is not one)."""
        return ctx.integer(name)

    def date_param(self, text: str) -> datetime:
        """A date query parameter (400 when it is not one)."""
        try:
            return parse_date(text)
        except ValueError:
            raise HttpError(400, f"The value '{text}' is not valid.") from None

    def kinds(self, ctx: Ctx) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``IncludeItemTypes`` and ``ExcludeItemTypes`` as ``BaseItemKind`` names."""

        def known(name: str) -> tuple[str, ...]:
            found = (_ITEM_KINDS.get(k.lower()) for k in ctx.array(name))
            return tuple(k for k in found if k is not None)

        return known("includeItemTypes"), known("excludeItemTypes")

    def optional_user(self, ctx: Ctx) -> EmuUser | None:
        """``ReqH.GetUserId`` then ``GetUserById`` where a missing user just means no user
        data (TV routes): 403 for a non-admin naming another user, None for an API key."""
        caller = ctx.caller
        assert caller is not None
        text = self._path_or_query_user(ctx)
        if not text:
            return caller.user
        user_id = parse_guid(text)
        if user_id != caller.user_id and not caller.is_admin:
            raise HttpError(403, "Forbidden")
        return self.emu.users.get(user_id)

    def required_user(self, ctx: Ctx) -> EmuUser:
        """The user a user-scoped route acts for (status codes of ``_user_for``)."""
        return self._user_for(ctx, self._path_or_query_user(ctx))

    def item_dtos(
        self, ctx: Ctx, items: list[LibraryItem], user: EmuUser | None
    ) -> list[dict[str, Any]]:
        """Item DTOs with the request's ``Fields``, ``EnableUserData`` and ``EnableImages``."""
        fields = frozenset(f.lower() for f in ctx.array("fields"))
        enable_user_data = bool(ctx.boolean("enableUserData", True))
        enable_images = bool(ctx.boolean("enableImages", True))
        return [
            self._item_dto(
                item,
                user,
                fields,
                enable_user_data=enable_user_data,
                enable_images=enable_images,
            )
            for item in items
        ]

    async def items_list(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items`` and ``GET /Users/{userId}/Items`` (§5)."""
        user = self._items_user(ctx)
        query = self._item_query(ctx, user)
        start = ctx.integer("startIndex") or 0
        limit = ctx.integer("limit")
        if start < 0 or (limit is not None and limit < 0):
            raise HttpError(400, "startIndex and limit must not be negative")
        ids = self.queries.run(query)
        page = ids[start : start + limit if limit is not None else None]
        fields = frozenset(f.lower() for f in ctx.array("fields"))
        enable_user_data = bool(ctx.boolean("enableUserData", True))
        enable_images = bool(ctx.boolean("enableImages", True))
        library = self.emu.library
        items = [
            self._item_dto(
                item,
                user,
                fields,
                enable_user_data=enable_user_data,
                enable_images=enable_images,
            )
            for item in (library.get(i) for i in page)
            if item is not None
        ]
        total = len(ids)
        if not ctx.boolean("enableTotalRecordCount", True):
            # The repository then returns only the page and counts it.
            total = len(items)
        return json_response({"Items": items, "TotalRecordCount": total, "StartIndex": start})

    async def item_get(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/{itemId}`` and ``GET /Users/{userId}/Items/{itemId}``: all fields."""
        parse_guid(ctx.params["itemId"])
        user = self._items_user(ctx)
        item = self._item_for(ctx, ctx.params["itemId"])
        return json_response(self._item_dto(item, user, _ALL_FIELDS))

    async def user_views(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /UserViews``: the library roots as the user sees them."""
        user = self.required_user(ctx)
        folders = self.emu.library.collection_folders
        items = [self._item_dto(f, user, frozenset()) for f in folders]
        return json_response({"Items": items, "TotalRecordCount": len(items), "StartIndex": 0})

    # --- user data -----------------------------------------------------------------------

    async def user_data_get(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /UserItems/{itemId}/UserData`` (+ legacy alias)."""
        user, item = self._user_and_item(ctx)
        return self._user_data_response(user, item)

    async def user_data_post(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /UserItems/{itemId}/UserData``: partial update, §4.2 semantics."""
        parse_guid(ctx.params["itemId"])
        body = await self._json_body(ctx)
        update = _parse_update(body)
        user, item = self._user_and_item(ctx)
        rating = update.get("rating")
        if rating is not None and not 0 <= rating <= 10:
            raise HttpError(400, "Rating must be between 0 and 10")

        def change(data: StoredUserData) -> None:
            # UDM.SaveUserData copies only present fields, in this order (Rating beats Likes).
            if update.get("playbackpositionticks") is not None:
                data.position_ticks = update["playbackpositionticks"]
            if update.get("playcount") is not None:
                data.play_count = update["playcount"]
            if update.get("isfavorite") is not None:
                data.is_favorite = update["isfavorite"]
            if update.get("likes") is not None:
                data.rating = 10.0 if update["likes"] else 1.0
            if update.get("played") is not None:
                data.played = update["played"]
            if update.get("lastplayeddate") is not None:
                data.last_played = update["lastplayeddate"]
            if rating is not None:
                data.rating = float(rating)

        self.emu.save(user, item, change, "UpdateUserData")
        return self._user_data_response(user, item)

    async def favorite_add(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /UserFavoriteItems/{itemId}`` (+ legacy)."""
        return await self._set_favorite(ctx, True)

    async def favorite_remove(self, ctx: Ctx) -> web.StreamResponse:
        """``DELETE /UserFavoriteItems/{itemId}`` (+ legacy)."""
        return await self._set_favorite(ctx, False)

    async def _set_favorite(self, ctx: Ctx, value: bool) -> web.StreamResponse:
        user, item = self._user_and_item(ctx)

        def change(data: StoredUserData) -> None:
            data.is_favorite = value

        self.emu.save(user, item, change, "UpdateUserRating")
        return self._user_data_response(user, item)

    async def rating_set(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /UserItems/{itemId}/Rating?likes=``: 10, 1, or cleared when absent."""
        likes = ctx.boolean("likes")
        return await self._set_rating(ctx, None if likes is None else (10.0 if likes else 1.0))

    async def rating_clear(self, ctx: Ctx) -> web.StreamResponse:
        """``DELETE /UserItems/{itemId}/Rating``: Rating = null."""
        return await self._set_rating(ctx, None)

    async def _set_rating(self, ctx: Ctx, rating: float | None) -> web.StreamResponse:
        user, item = self._user_and_item(ctx)

        def change(data: StoredUserData) -> None:
            data.rating = rating

        self.emu.save(user, item, change, "UpdateUserRating")
        return self._user_data_response(user, item)

    async def played_add(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /UserPlayedItems/{itemId}?datePlayed=`` (+ legacy): MarkPlayed, recursing."""
        user, item = self._user_and_item(ctx)
        raw_date = ctx.first("datePlayed")
        date_played = None
        if raw_date:
            try:
                date_played = parse_date(raw_date)
            except ValueError:
                raise HttpError(400, f"The value '{raw_date}' is not valid.") from None
        for target in self._played_users(ctx, user):
            self._mark(target, item, played=True, date_played=date_played)
        return self._user_data_response(user, item)

    async def played_remove(self, ctx: Ctx) -> web.StreamResponse:
        """``DELETE /UserPlayedItems/{itemId}`` (+ legacy): MarkUnplayed, recursing."""
        user, item = self._user_and_item(ctx)
        for target in self._played_users(ctx, user):
            self._mark(target, item, played=False, date_played=None)
        return self._user_data_response(user, item)

    def _played_users(self, ctx: Ctx, user: EmuUser) -> list[EmuUser]:
        """The target plus the AdditionalUsers of the caller's session (§2.4 hazards 1, 3)."""
        caller = ctx.caller
        assert caller is not None
        # 10.9+: ReqH.GetSession(..., userId) re-points the caller's session at the target;
        # 10.8 logs the caller's own user.
        session_user = user.id if self.version.at_least(10, 9) else caller.user_id
        session = self.emu.hub.log_session_activity(
            caller.client or "",
            caller.version or "",
            caller.device_id or "",
            caller.device or "",
            session_user,
        )
        extra = [self.emu.users.get(u) for u in session.additional_users if u != user.id]
        return [user, *(u for u in extra if u is not None)]

    def _mark(
        self, user: EmuUser, item: LibraryItem, *, played: bool, date_played: datetime | None
    ) -> None:
        lib = self.emu.library
        if item.is_folder:
            # Folder.MarkPlayed/MarkUnplayed: every leaf below, the folder itself untouched.
            targets = [lib.get(i) for i in lib.descendants(item.id)]
            for leaf in targets:
                if leaf is not None and leaf.is_leaf:
                    self._mark(user, leaf, played=played, date_played=date_played)
            return
        now = self.emu.now()

        def mark_played(data: StoredUserData) -> None:
            if date_played is not None:
                data.play_count += 1
            data.play_count = max(data.play_count, 1)
            data.position_ticks = 0
            data.last_played = date_played or data.last_played or now
            data.played = True

        def mark_unplayed(data: StoredUserData) -> None:
            data.play_count = 0
            data.position_ticks = 0
            data.last_played = None
            data.played = False

        self.emu.save(user, item, mark_played if played else mark_unplayed, "TogglePlayed")

    # --- sessions and playback -----------------------------------------------------------

    def _session_dto(self, session: Session) -> dict[str, Any]:
        return self.sessions.session_dto(session)

    def plain_item_dto(self, item: LibraryItem, user: EmuUser | None) -> dict[str, Any]:
        """An item DTO with no optional fields (``NowPlayingItem``, ``/Items/Root``...)."""
        return self._item_dto(item, user, frozenset())

    def session_users(self, session: Session) -> list[EmuUser]:
        """``SM.GetUsers(session)``: the session's user and its additional users."""
        ids = [session.user_id, *session.additional_users] if session.user_id else []
        return [self.emu.users[u] for u in ids if u in self.emu.users]

    def note_playing(
        self,
        session: Session,
        item: LibraryItem | None,
        position: int | None,
        *,
        paused: bool,
        method: str | None,
    ) -> None:
        """Remember what a session plays (``NowPlayingItem``, ``PlayState``) and when it last
        reported (``LastPlaybackCheckIn``)."""
        session.last_checkin_ms = self.emu.clock.wall_ms()
        if item is None:
            return
        session.now_playing = item.id
        if position is not None:
            session.position_ticks = max(position, 0)
        session.is_paused = paused
        if method is not None:
            session.play_method = method
        self.emu.hub.sessions_changed()

    def note_stopped(self, session: Session) -> None:
        """The session plays nothing any more."""
        session.last_checkin_ms = self.emu.clock.wall_ms()
        session.now_playing = None
        session.position_ticks = None
        session.is_paused = False
        session.play_method = None
        self.emu.hub.sessions_changed()

    async def json_body(self, ctx: Ctx, *, required: bool = True) -> dict[str, Any]:
        """A JSON object body (400 when missing or malformed, 415 without a JSON type)."""
        return await self._json_body(ctx, required=required)

    async def session_add_user(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/{sessionId}/User/{userId}``: AdditionalUsers (§2.4)."""
        session = self.emu.hub.session_by_id(ctx.params["sessionId"].lower())
        user_id = parse_guid(ctx.params["userId"])
        if session is None:
            raise HttpError(404, "Session not found")
        if session.user_id == user_id:
            raise HttpError(400, "The requested user is already the primary user of the session.")
        if user_id not in self.emu.users:
            raise HttpError(404, "User not found")
        if user_id not in session.additional_users:
            session.additional_users.append(user_id)
        return no_content()

    async def session_remove_user(self, ctx: Ctx) -> web.StreamResponse:
        """``DELETE /Sessions/{sessionId}/User/{userId}``."""
        session = self.emu.hub.session_by_id(ctx.params["sessionId"].lower())
        user_id = parse_guid(ctx.params["userId"])
        if session is None:
            raise HttpError(404, "Session not found")
        if user_id in session.additional_users:
            session.additional_users.remove(user_id)
        return no_content()

    async def _playback(
        self, ctx: Ctx
    ) -> tuple[Session, list[EmuUser], LibraryItem | None, dict[str, Any]]:
        body = {k.lower(): v for k, v in (await self._json_body(ctx, required=False)).items()}
        session = self.sessions.caller_session(ctx)
        users = self.session_users(session)
        item = None
        raw_item = body.get("itemid")
        if isinstance(raw_item, str) and raw_item:
            item = self.emu.library.get(parse_guid(raw_item))
        return session, users, item, body

    async def playing_start(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/Playing``: PlayCount+1, LastPlayedDate=now; up to 10.11 a resumable
        video is un-played, from 12.0 (113bd9af05) Played is left alone (Corrections 3)."""
        session, users, item, body = await self._playback(ctx)
        position = _position(body, negative_ok=True)
        method = body.get("playmethod")
        self.note_playing(
            session,
            item,
            position or 0,
            paused=body.get("ispaused") is True,
            method=method if method in ("Transcode", "DirectStream", "DirectPlay") else None,
        )
        self.start_playback(users, item)
        return no_content()

    def start_playback(self, users: list[EmuUser], item: LibraryItem | None) -> None:
        """``SM.OnPlaybackStart`` for each user of the session (pushed: PlaybackStart)."""
        if item is None or not item.is_leaf:
            return
        now = self.emu.now()
        unplays = not self.version.at_least(12)

        def start(data: StoredUserData) -> None:
            data.play_count += 1
            data.last_played = now
            if unplays:
                # Videos support position ticks, so playback start un-plays them.
                data.played = False

        for user in users:
            self.emu.save(user, item, start, "PlaybackStart")

    async def playing_progress(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/Playing/Progress``: resume rules applied and saved, never pushed."""
        session, users, item, body = await self._playback(ctx)
        position = _position(body, negative_ok=True)
        self.note_playing(session, item, position, paused=body.get("ispaused") is True, method=None)
        self.progress_playback(users, item, position)
        return no_content()

    def progress_playback(
        self, users: list[EmuUser], item: LibraryItem | None, position: int | None
    ) -> None:
        """``SM.OnPlaybackProgress``: ``UDM.UpdatePlayState`` then a PlaybackProgress save.

        Below 5 % the position is stored as 0; past 90 % the item becomes Played at position 0
        with PlayCount + 1 and LastPlayedDate = now (Corrections 2, counted once: when it turns
        played). Nothing of this is pushed, so a server can become Played with no event.
        """
        if item is None or not item.is_leaf or position is None:
            return
        runtime = item.run_time_ticks or 0
        now = self.emu.now()

        def progress(data: StoredUserData) -> None:
            data.position_ticks, done = _resume_position(max(position, 0), runtime)
            if done and not data.played:
                data.played = True
                data.play_count += 1
                data.last_played = now

        for user in users:
            self.emu.save(user, item, progress, "PlaybackProgress")

    async def playing_stopped(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/Playing/Stopped``: resume thresholds decide position and played;
        ``Failed: true`` saves nothing; a negative position is 400."""
        session, users, item, body = await self._playback(ctx)
        position = _position(body, negative_ok=False)
        self.note_stopped(session)
        if body.get("failed") is True:
            return no_content()
        self.stop_playback(users, item, position)
        return no_content()

    def stop_playback(
        self, users: list[EmuUser], item: LibraryItem | None, position: int | None
    ) -> None:
        """``SM.OnPlaybackStopped`` for each user of the session (pushed: PlaybackFinished)."""
        if item is None or not item.is_leaf:
            return
        runtime = item.run_time_ticks or 0

        def stop(data: StoredUserData) -> None:
            if position is None:
                # The client could not say where it stopped: Jellyfin assumes it finished.
                data.play_count += 1
                data.played = True
                data.position_ticks = 0
                return
            data.position_ticks, done = _resume_position(position, runtime)
            if done:
                data.played = True

        for user in users:
            self.emu.save(user, item, stop, "PlaybackFinished")


def _position(body: dict[str, Any], *, negative_ok: bool) -> int | None:
    """``PositionTicks`` of a playback report (a number or a numeric string); 400 when it is
    something else, or negative where the server refuses that (stop)."""
    raw = body.get("positionticks")
    if raw is None:
        return None
    position = json_int(raw)
    if position is None:
        raise HttpError(400, "The JSON value could not be converted for PositionTicks.")
    if position < 0 and not negative_ok:
        raise HttpError(400, "PositionTicks must not be negative.")
    return position


def _resume_position(position: int, runtime: int) -> tuple[int, bool]:
    """``UDM.UpdatePlayState``: (position to store, played to completion)."""
    if runtime <= 0:
        return 0, True
    if position <= 0:
        return 0, False
    pct = 100.0 * position / runtime
    if pct < MIN_RESUME_PCT:
        return 0, False
    if pct > MAX_RESUME_PCT or position >= runtime - _TICKS_PER_SECOND:
        return 0, True
    if runtime / _TICKS_PER_SECOND < MIN_RESUME_DURATION_S:
        return 0, True
    return position, False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: What ``JsonNumberHandling.AllowReadingFromString`` (Jellyfin's JSON options) reads as a number.
_INT_TEXT = re.compile(r"-?\d+")
_NUMBER_TEXT = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def json_int(value: Any) -> int | None:
    """A JSON integer, or a string holding one (Jellyfin reads numbers from strings); None
    when it is neither."""
    if _is_int(value):
        assert isinstance(value, int)
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    return None


def json_number(value: Any) -> float | None:
    """A JSON number, or a string holding one; None when it is neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value):
        return float(value)
    return None


def _parse_update(body: dict[str, Any]) -> dict[str, Any]:
    """Bind ``UpdateUserItemDataDto`` case-insensitively; wrong JSON types are 400."""
    out: dict[str, Any] = {}
    for raw_key, value in body.items():
        key = raw_key.lower()
        kind = _UPDATE_FIELDS.get(key)
        if kind is None or value is None:
            continue
        if kind == "int":
            value = json_int(value)
        elif kind == "number":
            number = json_number(value)
            value = int(number) if number is not None and number.is_integer() else number
        if value is None:
            raise HttpError(400, f"The JSON value could not be converted for {raw_key}.")
        if kind == "bool" and not isinstance(value, bool):
            raise HttpError(400, f"The JSON value could not be converted for {raw_key}.")
        if kind in ("string", "date") and not isinstance(value, str):
            raise HttpError(400, f"The JSON value could not be converted for {raw_key}.")
        if kind == "date":
            try:
                value = parse_date(value)
            except ValueError:
                raise HttpError(
                    400, f"The JSON value could not be converted for {raw_key}."
                ) from None
        out[key] = value
    return out
