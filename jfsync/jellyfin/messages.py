"""Typed Jellyfin websocket messages and :func:`parse_message`, which turns one frame into one.

Every frame Jellyfin sends is ``{"MessageType": ..., "Data": ..., "MessageId": ...}``
(fact sheet §1.3). The types jfsync acts on get their own model: ``ForceKeepAlive``,
``KeepAlive``, ``UserDataChanged`` (§2.2), ``LibraryChanged``, ``Sessions`` (§1.5, what plays
where), ``ServerRestarting`` and ``ServerShuttingDown``. Every other type parses to
:class:`UnknownMessage`, so a new server version never breaks the reader. Models keep
Jellyfin's PascalCase through aliases, ignore unknown fields, and normalise ids to 32 lowercase
hex. A frame that is not JSON, not an object, has no ``MessageType``, or carries a known type
with a ``Data`` of the wrong shape raises :class:`MalformedMessageError`; the caller logs it
and skips the frame.

Large frames (a bulk action on a big library sends one ``UserDataChanged`` of tens of MB) are
parsed in steps: :func:`parse_message_steps` is a generator that pauses every
:data:`STEP_VALUES` JSON values and every :data:`STEP_VALUES` list entries validated, so the
socket's reader can give the event loop back between steps (:func:`parse_message` runs the
same steps without pausing); :func:`parse_message_decoded_steps` decodes the JSON at once and
validates in steps (for frames of a few hundred KiB: the socket's reader walks larger ones, whose
decode in one go held the loop too long). All accept exactly what ``json.loads`` accepts and
give the same message.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from json.decoder import WHITESPACE, scanstring  # type: ignore[attr-defined]
from typing import Any, Final, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jfsync.jellyfin.wire import JfId, UserItemDataDto


class MalformedMessageError(ValueError):
    """A websocket frame that is not a Jellyfin message of the shape its type promises."""

    def __init__(self, problem: str, message_type: str | None = None) -> None:
        self.problem = problem
        self.message_type = message_type
        where = f"{message_type} message" if message_type else "frame"
        super().__init__(f"malformed {where}: {problem}")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class _Message(_Wire):
    message_id: str | None = Field(default=None, alias="MessageId")


class ForceKeepAliveMessage(_Message):
    """``ForceKeepAlive``: the server asks for a KeepAlive now; ``Data`` is its lost timeout."""

    message_type: Literal["ForceKeepAlive"] = Field(default="ForceKeepAlive", alias="MessageType")
    timeout_s: float = Field(default=60.0, alias="Data")


class KeepAliveMessage(_Message):
    """``KeepAlive``: the server's reply to a KeepAlive we sent."""

    message_type: Literal["KeepAlive"] = Field(default="KeepAlive", alias="MessageType")


class UserDataChangeInfo(_Wire):
    """``UserDataChangeInfo``: one user's changed items, as DTOs built at flush time."""

    user_id: JfId = Field(alias="UserId")
    user_data_list: tuple[UserItemDataDto, ...] = Field(default=(), alias="UserDataList")

    @field_validator("user_data_list", mode="before")
    @classmethod
    def _drop_nulls(cls, value: Any) -> Any:
        # Up to 10.10 a null DTO can slip into the list; 10.11 filters them out (§2.2).
        if isinstance(value, list):
            return [entry for entry in value if entry is not None]
        return value


class UserDataChangedMessage(_Message):
    """``UserDataChanged``: the user data of some items (and their parents) changed."""

    message_type: Literal["UserDataChanged"] = Field(default="UserDataChanged", alias="MessageType")
    data: UserDataChangeInfo = Field(alias="Data")


class LibraryUpdateInfo(_Wire):
    """``LibraryUpdateInfo``: ids of items and folders added, removed or updated."""

    folders_added_to: tuple[JfId, ...] = Field(default=(), alias="FoldersAddedTo")
    folders_removed_from: tuple[JfId, ...] = Field(default=(), alias="FoldersRemovedFrom")
    items_added: tuple[JfId, ...] = Field(default=(), alias="ItemsAdded")
    items_removed: tuple[JfId, ...] = Field(default=(), alias="ItemsRemoved")
    items_updated: tuple[JfId, ...] = Field(default=(), alias="ItemsUpdated")
    collection_folders: tuple[JfId, ...] = Field(default=(), alias="CollectionFolders")

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return () if value is None else value


class LibraryChangedMessage(_Message):
    """``LibraryChanged``: items were added, removed or updated in the library."""

    message_type: Literal["LibraryChanged"] = Field(default="LibraryChanged", alias="MessageType")
    data: LibraryUpdateInfo = Field(default_factory=LibraryUpdateInfo, alias="Data")

    @field_validator("data", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class NowPlayingItem(_Wire):
    """The part of a session's ``NowPlayingItem`` (a ``BaseItemDto``) jfsync reads."""

    id: JfId = Field(alias="Id")
    run_time_ticks: int | None = Field(default=None, alias="RunTimeTicks")


class PlayStateInfo(_Wire):
    """``PlayerStateInfo``: where a session's playback is (live, from its check-ins)."""

    position_ticks: int | None = Field(default=None, alias="PositionTicks")
    is_paused: bool = Field(default=False, alias="IsPaused")


class SessionUserInfo(_Wire):
    """``SessionUserInfo``: an additional user of a session (fact sheet §2.4)."""

    user_id: JfId = Field(alias="UserId")


class SessionInfo(_Wire):
    """``SessionInfoDto``: one session as ``Sessions`` messages and ``GET /Sessions`` show it.

    Only what following playback needs: its id, users, what it plays, where, and when its
    player last reported (``LastPlaybackCheckIn``, moved by every progress report).
    """

    id: str = Field(alias="Id")
    user_id: JfId | None = Field(default=None, alias="UserId")
    additional_users: tuple[SessionUserInfo, ...] = Field(default=(), alias="AdditionalUsers")
    now_playing_item: NowPlayingItem | None = Field(default=None, alias="NowPlayingItem")
    play_state: PlayStateInfo = Field(default_factory=PlayStateInfo, alias="PlayState")
    last_playback_check_in: str | None = Field(default=None, alias="LastPlaybackCheckIn")

    @field_validator("additional_users", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return () if value is None else value

    @field_validator("play_state", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def user_ids(self) -> tuple[str, ...]:
        """The session's user (none for an API-key session: the empty Guid) and extra users."""
        main = () if self.user_id is None or self.user_id == _EMPTY_GUID else (self.user_id,)
        return main + tuple(u.user_id for u in self.additional_users if u.user_id not in main)


_EMPTY_GUID = "0" * 32


class SessionsMessage(_Message):
    """``Sessions``: every session the socket may see, after a ``SessionsStart`` (§1.5)."""

    message_type: Literal["Sessions"] = Field(default="Sessions", alias="MessageType")
    data: tuple[SessionInfo, ...] = Field(default=(), alias="Data")

    @field_validator("data", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return () if value is None else value


class ServerRestartingMessage(_Message):
    """``ServerRestarting``: the server is about to restart; sockets will close."""

    message_type: Literal["ServerRestarting"] = Field(
        default="ServerRestarting", alias="MessageType"
    )


class ServerShuttingDownMessage(_Message):
    """``ServerShuttingDown``: the server is about to stop; sockets will close."""

    message_type: Literal["ServerShuttingDown"] = Field(
        default="ServerShuttingDown", alias="MessageType"
    )


class UnknownMessage(_Message):
    """Any message type jfsync does not act on; ``data`` is kept raw for debug logs."""

    message_type: str = Field(alias="MessageType")
    data: Any = Field(default=None, alias="Data")


Message = (
    ForceKeepAliveMessage
    | KeepAliveMessage
    | UserDataChangedMessage
    | LibraryChangedMessage
    | ServerRestartingMessage
    | ServerShuttingDownMessage
    | SessionsMessage
    | UnknownMessage
)

_MODELS: dict[str, type[_Message]] = {
    "ForceKeepAlive": ForceKeepAliveMessage,
    "KeepAlive": KeepAliveMessage,
    "UserDataChanged": UserDataChangedMessage,
    "LibraryChanged": LibraryChangedMessage,
    "ServerRestarting": ServerRestartingMessage,
    "ServerShuttingDown": ServerShuttingDownMessage,
    "Sessions": SessionsMessage,
}

#: The messages whose ``Data`` can hold long lists (validated in steps when they do).
_STEPPED: frozenset[type[_Message]] = frozenset({UserDataChangedMessage, LibraryChangedMessage})

#: The one frame jfsync sends: Jellyfin parses inbound JSON case-sensitively (§1.3).
KEEPALIVE_FRAME = '{"MessageType":"KeepAlive"}'


def sessions_start_frame(period_ms: int) -> str:
    """The ``SessionsStart`` subscription: a ``Sessions`` message at once, then every
    ``period_ms`` and on every session or playback event (§1.5)."""
    return json.dumps({"MessageType": "SessionsStart", "Data": f"0,{int(period_ms)}"})


#: The largest message accepted by default (``servers[].max_message_size``): twice the largest
#: UserDataChanged a 100,000-item library can send (31.3 MiB: every entry with every field
#: at its longest, plus a parent folder per ten items; docs/design-notes.md).
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
#: JSON values read, or list entries validated, between two pauses of a stepped parse
#: (a few milliseconds of work).
STEP_VALUES: Final = 500
#: How deep a stepped parse walks objects and arrays itself: the message, its ``Data``, the
#: lists in it. Their entries (small objects) are read whole, in C.
WALK_DEPTH: Final = 3

_DECODER = json.JSONDecoder()
_ATOM_START = frozenset('{["-0123456789tfnNI')


def parse_message(frame: str | bytes) -> Message:
    """Parse one websocket frame; raise MalformedMessageError when it is not a valid message."""
    if len(frame) < 64 * 1024:
        # Small frames, the usual case: one json.loads, one validation.
        return _finish(_decode(frame))
    steps = parse_message_steps(frame)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(Message, done.value)


def parse_message_steps(
    frame: str | bytes, step: int = STEP_VALUES
) -> Generator[None, None, Message]:
    """Parse ``frame`` like :func:`parse_message`, pausing (yielding) every ``step`` values."""
    text = _text(frame)
    try:
        walker = _Walker(text, step)
        raw = yield from walker.value(0)
        end = WHITESPACE.match(text, walker.pos).end()
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as err:
        raise MalformedMessageError(f"not JSON ({err.msg} at position {err.pos})") from None
    except RecursionError:
        raise MalformedMessageError("nested too deeply") from None
    return (yield from _validate(raw, step))


def parse_message_decoded_steps(
    frame: str | bytes, step: int = STEP_VALUES
) -> Generator[None, None, Message]:
    """Parse ``frame`` like :func:`parse_message_steps`, but decode its JSON at once.

    ``json.loads`` reads a few hundred KiB in about the time of one validation step, and
    faster than the walk of :func:`parse_message_steps` (a 1.4 MB frame of 10,000 entries:
    9 ms against some 25): for a frame of that size only the validation is done in steps. The
    decode is one step, though, as long as the frame is large.
    """
    raw = _decode(frame)
    return (yield from _validate(raw, step))


def _text(frame: str | bytes) -> str:
    if isinstance(frame, bytes):
        try:
            return frame.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError("binary frame that is not UTF-8 text") from None
    return frame


def _decode(frame: str | bytes) -> Any:
    try:
        return json.loads(_text(frame))
    except json.JSONDecodeError as err:
        raise MalformedMessageError(f"not JSON ({err.msg} at position {err.pos})") from None
    except RecursionError:
        raise MalformedMessageError("nested too deeply") from None


class _Walker:
    """Reads JSON text value by value, walking objects and arrays itself so it can pause."""

    def __init__(self, text: str, step: int) -> None:
        self.text = text
        self.pos = 0
        self.count = 0
        self.step = step

    def value(self, depth: int) -> Generator[None, None, Any]:
        text = self.text
        pos = WHITESPACE.match(text, self.pos).end()
        char = text[pos : pos + 1]
        self.count += 1
        if self.count % self.step == 0:
            yield
        if (char == "{" or char == "[") and depth < WALK_DEPTH:
            self.pos = pos + 1
            if char == "{":
                return (yield from self._object(depth + 1))
            return (yield from self._array(depth + 1))
        if char not in _ATOM_START:
            raise json.JSONDecodeError("Expecting value", text, pos)
        value, self.pos = _DECODER.raw_decode(text, pos)
        return value

    def _object(self, depth: int) -> Generator[None, None, dict[str, Any]]:
        text = self.text
        result: dict[str, Any] = {}
        pos = WHITESPACE.match(text, self.pos).end()
        if text[pos : pos + 1] == "}":
            self.pos = pos + 1
            return result
        while True:
            if text[pos : pos + 1] != '"':
                raise json.JSONDecodeError(
                    "Expecting property name enclosed in double quotes", text, pos
                )
            key, pos = scanstring(text, pos + 1)
            pos = WHITESPACE.match(text, pos).end()
            if text[pos : pos + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
            self.pos = pos + 1
            result[key] = yield from self.value(depth)
            pos = WHITESPACE.match(text, self.pos).end()
            char = text[pos : pos + 1]
            if char == "}":
                self.pos = pos + 1
                return result
            if char != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = WHITESPACE.match(text, pos + 1).end()

    def _array(self, depth: int) -> Generator[None, None, list[Any]]:
        text = self.text
        result: list[Any] = []
        pos = WHITESPACE.match(text, self.pos).end()
        if text[pos : pos + 1] == "]":
            self.pos = pos + 1
            return result
        if depth >= WALK_DEPTH:
            # Every entry is read whole (what value() would do for each): in one loop here,
            # without a generator per entry (a tenth off the walk of a 10,000-entry list; its
            # delimiter checks are _object's, written out here to keep a call per entry off).
            return (yield from self._flat_array(pos, result))
        while True:
            result.append((yield from self.value(depth)))
            pos = WHITESPACE.match(text, self.pos).end()
            char = text[pos : pos + 1]
            if char == "]":
                self.pos = pos + 1
                return result
            if char != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            self.pos = pos + 1

    def _flat_array(self, pos: int, result: list[Any]) -> Generator[None, None, list[Any]]:
        """The entries of an array from ``pos`` (its first one), each read whole."""
        text, step = self.text, self.step
        decode, skip, append = _DECODER.raw_decode, WHITESPACE.match, result.append
        count = self.count
        try:
            while True:
                if text[pos : pos + 1] not in _ATOM_START:
                    raise json.JSONDecodeError("Expecting value", text, pos)
                value, pos = decode(text, pos)
                append(value)
                count += 1
                if count % step == 0:
                    self.count = count
                    yield
                pos = skip(text, pos).end()
                char = text[pos : pos + 1]
                if char == "]":
                    self.pos = pos + 1
                    return result
                if char != ",":
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
                pos = skip(text, pos + 1).end()
        finally:
            self.count = count


def _finish(raw: Any) -> Message:
    steps = _validate(raw, step=None)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(Message, done.value)


def _validate(raw: Any, step: int | None) -> Generator[None, None, Message]:
    """Validate a decoded frame; long lists in ``Data`` are validated ``step`` entries at a time."""
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"expected a JSON object, got {type(raw).__name__}")
    message_type = raw.get("MessageType")
    if not isinstance(message_type, str) or not message_type:
        raise MalformedMessageError("no MessageType")
    model = _MODELS.get(message_type, UnknownMessage)
    data = raw.get("Data")
    long_lists: dict[str, list[Any]] = {}
    if step is not None and model in _STEPPED and isinstance(data, dict):
        long_lists = {k: v for k, v in data.items() if isinstance(v, list) and len(v) > step}
    try:
        if not long_lists:
            return cast(Message, model.model_validate(raw))
        assert step is not None
        assert isinstance(data, dict)
        short = {k: v for k, v in data.items() if k not in long_lists}
        message = model.model_validate({**raw, "Data": {**short, **{k: [] for k in long_lists}}})
    except ValidationError as err:
        raise MalformedMessageError(_describe(err), message_type) from None
    info = cast(_Wire, getattr(message, "data"))  # noqa: B009 - both _STEPPED models have it
    info_model = type(info)
    updates: dict[str, Any] = {}
    for alias, values in long_lists.items():
        name = next((n for n, f in info_model.model_fields.items() if f.alias == alias), None)
        if name is None:
            continue  # a field jfsync does not read
        parts: list[Any] = []
        for start in range(0, len(values), step):
            chunk = values[start : start + step]
            try:
                batch = info_model.model_validate({**short, alias: chunk})
            except ValidationError as err:
                raise MalformedMessageError(_describe(err, "Data", start), message_type) from None
            parts.extend(getattr(batch, name))
            # Free the decoded entries as they are done, not all at once at the end.
            values[start : start + step] = [None] * len(chunk)
            del chunk, batch
            yield
        updates[name] = tuple(parts)
    return cast(Message, message.model_copy(update={"data": info.model_copy(update=updates)}))


def _describe(err: ValidationError, prefix: str | None = None, offset: int = 0) -> str:
    """Name the first failing field without echoing its (possibly long) value."""
    first = err.errors(include_url=False, include_input=False)[0]
    loc = list(first["loc"])
    if prefix is not None:
        if len(loc) > 1 and isinstance(loc[1], int):
            loc[1] += offset
        loc.insert(0, prefix)
    where = ".".join(str(part) for part in loc) or "(message)"
    return f"{where}: {first['msg']}"
