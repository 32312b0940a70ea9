"""Typed Jellyfin websocket messages and :func:`parse_message`, which turns one frame into one.

Every frame Jellyfin sends is ``{"MessageType": ..., "Data": ..., "MessageId": ...}``
(fact sheet §1.3). The types jfsync acts on get their own model: ``ForceKeepAlive``,
``KeepAlive``, ``UserDataChanged`` (§2.2), ``LibraryChanged``, ``ServerRestarting`` and
``ServerShuttingDown``. Every other type parses to :class:`UnknownMessage`, so a new server
version never breaks the reader. Models keep Jellyfin's PascalCase through aliases, ignore
unknown fields, and normalise ids to 32 lowercase hex. A frame that is not JSON, not an
object, has no ``MessageType``, or carries a known type with a ``Data`` of the wrong shape
raises :class:`MalformedMessageError`; the caller logs it and skips the frame.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast

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
    | UnknownMessage
)

_MODELS: dict[str, type[_Message]] = {
    "ForceKeepAlive": ForceKeepAliveMessage,
    "KeepAlive": KeepAliveMessage,
    "UserDataChanged": UserDataChangedMessage,
    "LibraryChanged": LibraryChangedMessage,
    "ServerRestarting": ServerRestartingMessage,
    "ServerShuttingDown": ServerShuttingDownMessage,
}

#: The one frame jfsync sends: Jellyfin parses inbound JSON case-sensitively (§1.3).
KEEPALIVE_FRAME = '{"MessageType":"KeepAlive"}'


def parse_message(frame: str | bytes) -> Message:
    """Parse one websocket frame; raise MalformedMessageError when it is not a valid message."""
    if isinstance(frame, bytes):
        try:
            frame = frame.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError("binary frame that is not UTF-8 text") from None
    try:
        raw = json.loads(frame)
    except json.JSONDecodeError as err:
        raise MalformedMessageError(f"not JSON ({err.msg} at position {err.pos})") from None
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"expected a JSON object, got {type(raw).__name__}")
    message_type = raw.get("MessageType")
    if not isinstance(message_type, str) or not message_type:
        raise MalformedMessageError("no MessageType")
    model = _MODELS.get(message_type, UnknownMessage)
    try:
        parsed = model.model_validate(raw)
    except ValidationError as err:
        raise MalformedMessageError(_describe(err), message_type) from None
    return cast(Message, parsed)


def _describe(err: ValidationError) -> str:
    """Name the first failing field without echoing its (possibly long) value."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "(message)"
    return f"{where}: {first['msg']}"
