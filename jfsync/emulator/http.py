"""What every emulator route handler shares: the request context, error answers, parsers.

:class:`Ctx` is one request as a handler sees it, :class:`Route` one entry of the route table,
:class:`HttpError` an error answer shaped as ASP.NET shapes it; ``json_response`` and
``no_content`` build answers, ``parse_guid``/``parse_date``/``parse_auth_header`` read what
clients send. :class:`ItemViews` is the part of :class:`jfsync.emulator.app.JellyfinApi` the
route groups in :mod:`jfsync.emulator.browse` and :mod:`jfsync.emulator.session_routes` call
back into, so they depend on this module and never on ``app`` (which assembles them).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote_plus

from aiohttp import web

from jfsync.emulator.library import LibraryItem
from jfsync.emulator.query import ItemQueryEngine
from jfsync.emulator.sockets import Session
from jfsync.emulator.state import Caller, EmuUser, ServerVersion
from jfsync.emulator.view import EmulatorLike
from jfsync.ids import InvalidIdError, normalize_id

Handler = Callable[["Ctx"], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    """An error answer: status plus the body Jellyfin would send."""

    def __init__(self, status: int, detail: str = "", *, bare: bool = False) -> None:
        super().__init__(f"HTTP {status} {detail}".strip())
        self.status = status
        self.detail = detail
        self.bare = bare

    def response(self) -> web.Response:
        """Build the answer as ASP.NET would shape it for this status."""
        if self.bare:
            return web.Response(status=self.status)
        if self.status in (400, 404, 415):
            titles = {400: "Bad Request", 404: "Not Found", 415: "Unsupported Media Type"}
            body: dict[str, Any] = {
                "type": "https://tools.ietf.org/html/rfc9110",
                "title": titles[self.status],
                "status": self.status,
                "traceId": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00",
            }
            if self.detail:
                body["detail"] = self.detail
            return web.Response(
                status=self.status,
                text=json.dumps(body),
                content_type="application/problem+json",
                charset="utf-8",
            )
        if self.status in (401, 405):
            return web.Response(status=self.status)
        # ExceptionMiddleware answers SecurityException and server errors with plain text.
        return web.Response(status=self.status, text="Error processing request.")


@dataclass(frozen=True, slots=True)
class Route:
    """One route: method, path template, handler and the rules around it."""

    method: str
    template: str
    handler: Handler
    auth: str = "user"
    documented: bool = True
    write: bool = False
    regex: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        """Compile the template to a case-insensitive regex."""
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        object.__setattr__(self, "regex", re.compile(f"^{pattern}/?$", re.IGNORECASE))


@dataclass(slots=True)
class Ctx:
    """What a handler needs about one request."""

    request: web.Request
    params: dict[str, str]
    query: dict[str, list[str]]
    caller: Caller | None
    auth: dict[str, str]
    route: Route
    body: Any = None
    write_user_id: str | None = None
    write_item_id: str | None = None

    def first(self, name: str) -> str | None:
        """Return the first value of a query parameter (names are case-insensitive)."""
        values = self.query.get(name.lower())
        return values[0] if values else None

    def array(self, name: str) -> list[str]:
        """Return an array parameter, comma-separated or repeated."""
        out: list[str] = []
        for raw in self.query.get(name.lower(), []):
            out.extend(part.strip() for part in raw.split(",") if part.strip())
        return out

    def boolean(self, name: str, default: bool | None = None) -> bool | None:
        """Return a boolean parameter; 400 when it is not true/false."""
        value = self.first(name)
        if value is None or value == "":
            return default
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise HttpError(400, f"The value '{value}' is not valid for {name}.")

    def integer(self, name: str) -> int | None:
        """Return an integer parameter; 400 when it is not one."""
        value = self.first(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise HttpError(400, f"The value '{value}' is not valid for {name}.") from None

    def guid(self, name: str) -> str | None:
        """Return a Guid query parameter as 32 hex; 400 when malformed."""
        value = self.first(name)
        if value is None or value == "":
            return None
        return parse_guid(value)


def guid_or_none(value: str) -> str | None:
    """Parse a Guid in any accepted form; ``None`` when malformed."""
    try:
        return normalize_id(value)
    except InvalidIdError:
        return None


def parse_guid(value: str) -> str:
    """Parse a Guid in any accepted form; 400 when malformed."""
    try:
        return normalize_id(value)
    except InvalidIdError:
        raise HttpError(400, f"The value '{value}' is not valid.") from None


def parse_auth_header(value: str, *, allow_emby: bool) -> dict[str, str] | None:
    """Parse ``MediaBrowser Key="value", …`` (keys case-sensitive, values URL-decoded)."""
    text = value.strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "mediabrowser" and not (allow_emby and scheme.lower() == "emby"):
        return None
    out: dict[str, str] = {}
    for part in _split_pairs(rest):
        key, sep, raw = part.partition("=")
        if not sep:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        out[key.strip()] = unquote_plus(raw)
    return out


def _split_pairs(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_date(value: str) -> datetime:
    """Parse ISO-8601 (any fraction length, zone optional = UTC) or ``yyyyMMddHHmmss``."""
    text = value.strip()
    if re.fullmatch(r"\d{14}", text):
        return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    match = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?(Z|[+-]\d{2}:?\d{2})?", text
    )
    if not match:
        raise ValueError(f"not a date: {value!r}")
    base, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    parsed = datetime.fromisoformat(f"{base.replace(' ', 'T')}.{micro}{_zone(zone)}")
    return parsed.astimezone(UTC)


def _zone(zone: str | None) -> str:
    if zone is None or zone == "Z":
        return "+00:00"
    if ":" not in zone:
        return f"{zone[:3]}:{zone[3:]}"
    return zone


def json_response(body: Any, status: int = 200) -> web.Response:
    """Answer with compact JSON as Jellyfin does."""
    return web.Response(
        status=status,
        text=json.dumps(body, separators=(",", ":")),
        content_type="application/json",
        charset="utf-8",
    )


def no_content() -> web.Response:
    """Answer 204."""
    return web.Response(status=204)


class ItemViews(Protocol):
    """What route groups need from the server's API: users, paging and item DTOs."""

    emu: EmulatorLike
    version: ServerVersion
    queries: ItemQueryEngine

    def paging(self, ctx: Ctx) -> tuple[int, int | None]:
        """``startIndex`` and ``limit``; 400 when negative."""
        ...

    def number(self, ctx: Ctx, name: str) -> int | None:
        """An integer query parameter; 400 when it is not one."""
        ...

    def date_param(self, text: str) -> datetime:
        """A date query parameter; 400 when it is not one."""
        ...

    def kinds(self, ctx: Ctx) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The known ``includeItemTypes`` and ``excludeItemTypes``."""
        ...

    def optional_user(self, ctx: Ctx) -> EmuUser | None:
        """The ``userId`` of the path or query, if any."""
        ...

    def required_user(self, ctx: Ctx) -> EmuUser:
        """The ``userId`` of the path or query, or the caller."""
        ...

    def item_dtos(
        self, ctx: Ctx, items: list[LibraryItem], user: EmuUser | None
    ) -> list[dict[str, Any]]:
        """Item DTOs with the fields the request asks for."""
        ...

    def plain_item_dto(self, item: LibraryItem, user: EmuUser | None) -> dict[str, Any]:
        """An item DTO with the default fields."""
        ...

    def session_users(self, session: Session) -> list[EmuUser]:
        """The users of a session."""
        ...

    def note_playing(
        self,
        session: Session,
        item: LibraryItem | None,
        position: int | None,
        *,
        paused: bool,
        method: str | None,
    ) -> None:
        """Remember what a session plays."""
        ...

    def note_stopped(self, session: Session) -> None:
        """Forget what a session played."""
        ...

    def start_playback(self, users: list[EmuUser], item: LibraryItem | None) -> None:
        """Playback started: the play count and last played date move."""
        ...

    def progress_playback(
        self, users: list[EmuUser], item: LibraryItem | None, position: int | None
    ) -> None:
        """Playback progressed: the resume position (or played, past the threshold)."""
        ...

    def stop_playback(
        self, users: list[EmuUser], item: LibraryItem | None, position: int | None
    ) -> None:
        """Playback stopped at ``position``."""
        ...

    async def json_body(self, ctx: Ctx, *, required: bool = True) -> dict[str, Any]:
        """The request's JSON object body; 400 when it is not one."""
        ...
