"""Jellyfin id handling: normalising ids at the boundary and deriving item ids from paths.

Jellyfin writes every Guid as 32 lowercase hex digits and accepts the dashed form on input.
jfsync normalises every id it receives to the 32-hex form here, once, so the rest of the code
compares plain strings. Item ids are derived the way the server derives them:
``MD5(UTF-16LE(type_full_name + path))`` read as a little-endian Guid.
"""

from __future__ import annotations

import hashlib
import re
import uuid

_HEX32 = re.compile(r"[0-9a-f]{32}")

#: Full .NET type names Jellyfin uses when it derives item ids, by ``BaseItemKind``.
ITEM_TYPE_FULL_NAMES: dict[str, str] = {
    "Movie": "MediaBrowser.Controller.Entities.Movies.Movie",
    "Series": "MediaBrowser.Controller.Entities.TV.Series",
    "Season": "MediaBrowser.Controller.Entities.TV.Season",
    "Episode": "MediaBrowser.Controller.Entities.TV.Episode",
    "Video": "MediaBrowser.Controller.Entities.Video",
    "MusicVideo": "MediaBrowser.Controller.Entities.MusicVideo",
    "Audio": "MediaBrowser.Controller.Entities.Audio.Audio",
    "MusicAlbum": "MediaBrowser.Controller.Entities.Audio.MusicAlbum",
    "Folder": "MediaBrowser.Controller.Entities.Folder",
    "CollectionFolder": "MediaBrowser.Controller.Entities.CollectionFolder",
}

#: Item kinds that carry user data worth syncing; parents (Series, Season, folders) do not.
LEAF_ITEM_TYPES: frozenset[str] = frozenset(
    {"Movie", "Episode", "Video", "MusicVideo", "Audio", "AudioBook", "Trailer"}
)


class InvalidIdError(ValueError):
    """A value that should be a Jellyfin Guid is not one."""


def normalize_id(value: str) -> str:
    """Return ``value`` as 32 lowercase hex digits; accept the dashed and braced forms.

    Raises InvalidIdError when the value is not a Guid in any accepted form.
    """
    if _HEX32.fullmatch(value):  # already normal: the common case, checked first
        return value
    text = value.strip().lower()
    if _HEX32.fullmatch(text):
        return text
    try:
        return uuid.UUID(text).hex
    except ValueError:
        raise InvalidIdError(f"not a Jellyfin id: {value!r}") from None


def is_id(value: str) -> bool:
    """Tell whether ``value`` parses as a Jellyfin Guid."""
    try:
        normalize_id(value)
    except InvalidIdError:
        return False
    return True


def derive_item_id(item_type: str, path: str) -> str:
    """Derive an item id from its kind and path the way Jellyfin's library manager does.

    ``item_type`` is a ``BaseItemKind`` name such as ``"Movie"`` or a full .NET type name.
    """
    full_name = ITEM_TYPE_FULL_NAMES.get(item_type, item_type)
    digest = hashlib.md5((full_name + path).encode("utf-16-le"), usedforsecurity=False).digest()
    return uuid.UUID(bytes_le=digest).hex


def session_id(client: str, device_id: str) -> str:
    """Return the id Jellyfin gives the session of ``client`` + ``device_id``."""
    digest = hashlib.md5((client + device_id).encode("utf-16-le"), usedforsecurity=False).digest()
    return uuid.UUID(bytes_le=digest).hex
