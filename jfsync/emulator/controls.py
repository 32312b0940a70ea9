"""Test controls over HTTP, under ``/__emulator__`` (a prefix real Jellyfin does not have).

They mirror the Python controls of :class:`jfsync.emulator.Emulator` so that a test or demo in
another process can drive a running emulator. No authentication: the emulator only listens on
loopback. Every answer is JSON.

=======  ===============================================  ==========================================
method   path                                             effect
=======  ===============================================  ==========================================
GET      /__emulator__/state                              version, ids, users, counts
POST     /__emulator__/fail-writes?count=N&status=S       fail the next N user-data writes
POST     /__emulator__/latency?seconds=X                  delay every HTTP answer
POST     /__emulator__/debounce?seconds=X                 change the UserDataChanged debounce
POST     /__emulator__/quick-connect?enabled=true|false   turn Quick Connect on or off
POST     /__emulator__/drop-sockets                       close every websocket
POST     /__emulator__/half-open-sockets                  silence every websocket without closing
POST     /__emulator__/restart?down_s=X                   stop the listener, wait, start it again
POST     /__emulator__/server-message?type=T              broadcast a message to every session
POST     /__emulator__/flush                              send pending pushes now
POST     /__emulator__/items                              add an item (JSON body, see below)
DELETE   /__emulator__/items/{id}                         remove an item
POST     /__emulator__/items/{id}/move?path=P             move an item's file
POST     /__emulator__/user-data/{userId}/{itemId}        save user data as that user would
POST     /__emulator__/wipe-user-data[?userId=U]          lose user data silently (reinstall)
GET      /__emulator__/requests[?since=N]                 request records (index N onwards)
GET      /__emulator__/writes[?since=N]                   user-data write records
POST     /__emulator__/save-state[?path=P]                save library and user data (--state)
=======  ===============================================  ==========================================

Request records never carry tokens: ``api_key``/``ApiKey`` values read ``<redacted>`` and
headers are not kept.

``POST /items`` takes ``{"type", "name", "year", "parent_id", "path", "provider_ids",
"index_number", "run_time_ticks"}``; ``/user-data`` takes the keyword arguments of
:meth:`Emulator.save_user_data` (dates as ISO strings) plus an optional ``reason``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from aiohttp import web

from jfsync.emulator.http import parse_date
from jfsync.emulator.library import LibraryError, LibraryItem
from jfsync.emulator.view import ControlledServer

_SAVE_KEYS = frozenset(
    {
        "played",
        "play_count",
        "is_favorite",
        "rating",
        "clear_rating",
        "clear_last_played",
        "position_ticks",
    }
)


def _record_json(index: int, record: Any) -> dict[str, Any]:
    """A request or write record as JSON (dataclass fields plus its index)."""
    return {"index": index, **asdict(record)}


def _reply(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def item_json(item: LibraryItem) -> dict[str, Any]:
    """Describe a library item for control answers."""
    return {
        "id": item.id,
        "type": item.type,
        "name": item.name,
        "path": item.path,
        "parent_id": item.parent_id,
        "provider_ids": item.provider_ids,
    }


async def handle_control(emu: ControlledServer, request: web.Request, path: str) -> web.Response:
    """Answer one control request; ``path`` is what follows the prefix."""
    parts = [p for p in path.split("/") if p]
    method = request.method
    query = request.query
    try:
        return await _route(emu, request, method, parts, query)
    except (ValueError, KeyError, LibraryError) as err:
        return _reply({"error": str(err)}, 400)


async def _route(
    emu: ControlledServer, request: web.Request, method: str, parts: list[str], query: Any
) -> web.Response:
    head = parts[0] if parts else ""
    if method == "GET" and head == "state":
        return _reply(_state(emu))
    if method == "GET" and head in ("requests", "writes"):
        since = int(query.get("since", "0"))
        rows = emu.requests if head == "requests" else emu.writes
        records = [_record_json(n, r) for n, r in enumerate(rows[since:], start=since)]
        return _reply({"total": len(rows), head: records})
    if method != "POST" and not (method == "DELETE" and head == "items"):
        return _reply({"error": "unknown control"}, 404)
    if head == "fail-writes":
        emu.fail_next_writes(int(query.get("count", "1")), int(query.get("status", "500")))
    elif head == "latency":
        emu.set_latency(float(query["seconds"]))
    elif head == "debounce":
        emu.set_debounce(float(query["seconds"]))
    elif head == "quick-connect":
        emu.set_quick_connect(query.get("enabled", "true").lower() == "true")
    elif head == "drop-sockets":
        await emu.drop_sockets()
    elif head == "half-open-sockets":
        return _reply({"sockets": emu.half_open_sockets()})
    elif head == "restart":
        down_s = float(query.get("down_s", "1"))
        emu.spawn(_restart(emu, down_s), name=f"emulator[{emu.server_name}]-restart")
    elif head == "server-message":
        return _reply({"sessions": await emu.send_server_message(query["type"])})
    elif head == "flush":
        await emu.flush_now()
    elif head == "wipe-user-data":
        return _reply({"dropped": emu.wipe_user_data(query.get("userId"))})
    elif head == "save-state":
        return _reply({"saved": emu.save_state(query.get("path"))})
    elif head == "items":
        return await _items(emu, request, method, parts[1:], query)
    elif head == "user-data" and len(parts) == 3:
        body = await request.json() if request.can_read_body else {}
        return _reply(_save(emu, parts[1], parts[2], body))
    else:
        return _reply({"error": "unknown control"}, 404)
    return _reply({"ok": True})


async def _items(
    emu: ControlledServer, request: web.Request, method: str, rest: list[str], query: Any
) -> web.Response:
    if method == "POST" and not rest:
        body = await request.json()
        item = emu.add_item(
            body.get("type", "Movie"),
            body["name"],
            year=body.get("year"),
            parent_id=body.get("parent_id"),
            path=body.get("path"),
            provider_ids=body.get("provider_ids"),
            index_number=body.get("index_number"),
            run_time_ticks=body.get("run_time_ticks"),
        )
        return _reply(item_json(item))
    if method == "DELETE" and len(rest) == 1:
        return _reply({"removed": [i.id for i in emu.remove_item(rest[0])]})
    if method == "POST" and len(rest) == 2 and rest[1] == "move":
        return _reply(item_json(emu.move_item(rest[0], query["path"])))
    return _reply({"error": "unknown control"}, 404)


def _save(
    emu: ControlledServer, user_id: str, item_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {k: v for k, v in body.items() if k in _SAVE_KEYS}
    if body.get("last_played"):
        kwargs["last_played"] = parse_date(body["last_played"])
    data = emu.save_user_data(user_id, item_id, body.get("reason", "UpdateUserData"), **kwargs)
    state = data.play_state
    return {
        "favorite": data.favorite,
        "rating": data.rating,
        "played": state.played,
        "play_count": state.play_count,
        "last_played_s": state.last_played_s,
        "position_ticks": state.position_ticks,
    }


async def _restart(emu: ControlledServer, down_s: float) -> None:
    # Let the control request's answer go out before the listener disappears.
    await emu.clock.sleep(0)
    await emu.stop_listener()
    await emu.clock.sleep(down_s)
    await emu.start_listener()


def _state(emu: ControlledServer) -> dict[str, Any]:
    return {
        "version": emu.version,
        "server_id": emu.server_id,
        "url": emu.url,
        "users": {u.name: u.id for u in emu.users.values()},
        "items": len(emu.library),
        "sockets": emu.socket_count(),
        "sessions": len(emu.hub.sessions),
        "requests": len(emu.requests),
        "writes": len(emu.writes),
    }
