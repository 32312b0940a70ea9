"""Saving and loading an emulated server's library and user data (``--state FILE``).

A state file is JSON: the server id and path root (item and user ids derive from them), every
library item below the physical folders in creation order, every user's stored user data by
user id, and the user data kept for removed items (re-attached when an item with the same
user-data key returns). It holds no users, passwords, tokens or keys: those come from the
command line, and user ids derive from the server id and the user name, so the same names find
their data again. Files are written atomically (a temporary file renamed over the old one).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jfsync.emulator.http import parse_date
from jfsync.emulator.library import LibraryItem
from jfsync.emulator.state import StoredUserData
from jfsync.emulator.view import SavedServer
from jfsync.jellyfin.wire import format_date

#: Version of the state file layout.
STATE_FORMAT = 1


class StateFileError(ValueError):
    """A state file that cannot be used; the message names the file and the problem."""


def _data_json(value: StoredUserData) -> dict[str, Any]:
    return {
        "rating": value.rating,
        "played": value.played,
        "play_count": value.play_count,
        "is_favorite": value.is_favorite,
        "last_played": format_date(value.last_played) if value.last_played else None,
        "position_ticks": value.position_ticks,
    }


def _data_from(raw: dict[str, Any]) -> StoredUserData:
    last = raw.get("last_played")
    return StoredUserData(
        rating=raw.get("rating"),
        played=bool(raw.get("played", False)),
        play_count=int(raw.get("play_count", 0)),
        is_favorite=bool(raw.get("is_favorite", False)),
        last_played=parse_date(last) if last else None,
        position_ticks=int(raw.get("position_ticks", 0)),
    )


def state_json(emu: SavedServer) -> dict[str, Any]:
    """Describe the server's library and user data as JSON-ready values."""
    users: dict[str, dict[str, Any]] = {}
    for user_id in emu.store.user_ids():
        rows = {
            item_id: emu.store.peek(user_id, item_id) for item_id in emu.store.items_of(user_id)
        }
        users[user_id] = {k: _data_json(v) for k, v in rows.items() if v is not None}
    return {
        "format": STATE_FORMAT,
        "server_id": emu.server_id,
        "version": emu.version,
        "path_root": emu.library.path_root,
        "items": [asdict(item) for item in emu.library.items()],
        "user_data": users,
        "kept_user_data": {
            key: {user: _data_json(v) for user, v in rows.items()}
            for key, rows in emu.kept_user_data().items()
        },
    }


def save_state(emu: SavedServer, path: str | Path) -> None:
    """Write the server's state to ``path`` atomically."""
    target = Path(path)
    text = json.dumps(state_json(emu), indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: str | Path) -> dict[str, Any]:
    """Read a state file; StateFileError names what is wrong with it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StateFileError(f"cannot read emulator state file {path}: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        raise StateFileError(
            f"{path} is not an emulator state file of format {STATE_FORMAT}; "
            "delete it or pass another --state file"
        )
    return raw


def load_state(emu: SavedServer, raw: dict[str, Any]) -> None:
    """Replace the library and user data of a fresh emulator with a saved state.

    The emulator must have been built with the saved ``server_id`` and path root (``Emulator``
    does that when given ``state_file=``), so the collection and physical folders match.
    """
    items = [LibraryItem(**_item_fields(entry)) for entry in raw.get("items", [])]
    emu.library.replace_items(items)
    emu.store.wipe()
    for user_id, rows in raw.get("user_data", {}).items():
        for item_id, data in rows.items():
            item = emu.library.get(item_id)
            if item is not None:
                emu.store.put(user_id, item_id, _data_from(data), is_leaf=item.is_leaf)
    kept = {
        key: {user: _data_from(data) for user, data in rows.items()}
        for key, rows in raw.get("kept_user_data", {}).items()
    }
    emu.restore_kept_user_data(kept)


def _item_fields(entry: dict[str, Any]) -> dict[str, Any]:
    fields = dict(entry)
    fields["provider_ids"] = dict(fields.get("provider_ids") or {})
    return fields
