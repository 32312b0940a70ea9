"""Session routes as clients see them (issue item 9): capabilities, logout, pings, the
``/PlayingItems/{itemId}`` playback routes and ``GET /Sessions`` with its filters.

Capabilities land on the caller's session (or the ``id`` given); ``POST /Sessions/Logout``
revokes the caller's token, which ends its session and closes its sockets; the
``/PlayingItems`` routes report playback like ``/Sessions/Playing`` with query parameters
instead of a body; ``GET /Sessions`` shows ``NowPlayingItem``, ``PlayState.PositionTicks`` and
``LastPlaybackCheckIn`` while something plays, and filters on ``deviceId``,
``activeWithinSeconds`` and ``controllableByUserId`` as ``SessionController.GetSessions`` does.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from jfsync.emulator import dto
from jfsync.emulator.http import Ctx, HttpError, ItemViews, json_response, no_content, parse_guid
from jfsync.emulator.sockets import Session
from jfsync.emulator.state import Caller

#: ``MediaType`` values (10.9+; 10.8 takes any string).
MEDIA_TYPES = ("Unknown", "Video", "Audio", "Photo", "Book")
#: ``GeneralCommandType`` values (10.10/10.11; ``SetPlaybackOrder`` is new in 10.9).
GENERAL_COMMANDS = [
    "MoveUp",
    "MoveDown",
    "MoveLeft",
    "MoveRight",
    "PageUp",
    "PageDown",
    "PreviousLetter",
    "NextLetter",
    "ToggleOsd",
    "ToggleContextMenu",
    "Select",
    "Back",
    "TakeScreenshot",
    "SendKey",
    "SendString",
    "GoHome",
    "GoToSettings",
    "VolumeUp",
    "VolumeDown",
    "Mute",
    "Unmute",
    "ToggleMute",
    "SetVolume",
    "SetAudioStreamIndex",
    "SetSubtitleStreamIndex",
    "ToggleFullscreen",
    "DisplayContent",
    "GoToSearch",
    "DisplayMessage",
    "SetRepeatMode",
    "ChannelUp",
    "ChannelDown",
    "Guide",
    "ToggleStats",
    "PlayMediaSource",
    "PlayTrailers",
    "SetShuffleQueue",
    "PlayState",
    "PlayNext",
    "ToggleOsdMenu",
    "Play",
    "SetMaxStreamingBitrate",
    "SetPlaybackOrder",
]
#: ``PlayMethod`` values.
PLAY_METHODS = ("Transcode", "DirectStream", "DirectPlay")


def _known(values: list[str], names: tuple[str, ...] | list[str]) -> list[str]:
    """Bind an enum list as ASP.NET does: case-insensitive, unknown values dropped."""
    by_lower = {n.lower(): n for n in names}
    out: list[str] = []
    for value in values:
        name = by_lower.get(value.lower())
        if name is not None and name not in out:
            out.append(name)
    return out


class SessionApi:
    """The session handlers of one emulated server."""

    def __init__(self, api: ItemViews) -> None:
        self.api = api
        self.emu = api.emu

    # --- helpers -------------------------------------------------------------------------

    def caller_session(self, ctx: Ctx) -> Session:
        """``ReqH.GetSession``: log activity for the caller's Client+DeviceId and return it."""
        caller = ctx.caller
        assert caller is not None
        return self.emu.hub.log_session_activity(
            caller.client or "",
            caller.version or "",
            caller.device_id or "",
            caller.device or "",
            caller.user_id,
        )

    def _target_session(self, ctx: Ctx) -> Session:
        wanted = ctx.first("id")
        if not wanted:
            return self.caller_session(ctx)
        session = self.emu.hub.session_by_id(wanted.lower())
        if session is None:
            raise HttpError(404, "Session not found")
        return session

    def session_dto(self, session: Session) -> dict[str, Any]:
        """The ``SessionInfoDto`` of a session, with what it plays."""
        emu = self.emu
        user = emu.users.get(session.user_id) if session.user_id else None
        extra = [emu.users[u] for u in session.additional_users if u in emu.users]
        playing = emu.library.get(session.now_playing) if session.now_playing else None
        now_playing = None
        if playing is not None:
            now_playing = self.api.plain_item_dto(playing, user)
        return dto.session_dto(
            session_id=session.id,
            user=user,
            client=session.client,
            device_id=session.device_id,
            device_name=session.device_name,
            app_version=session.app_version,
            last_activity_ms=session.last_activity_ms,
            additional_users=extra,
            server_id=emu.server_id,
            version=self.api.version,
            now_playing=now_playing,
            position_ticks=session.position_ticks,
            is_paused=session.is_paused,
            play_method=session.play_method,
            last_checkin_ms=session.last_checkin_ms,
            playable_media_types=session.playable_media_types,
            supported_commands=session.supported_commands,
            supports_media_control=session.supports_media_control,
        )

    def visible_sessions(self, viewer: Caller) -> list[Session]:
        """Admins and API keys see every session, a user only the sessions containing them."""
        sessions = list(self.emu.hub.sessions.values())
        if viewer.is_admin:
            return sessions
        return [s for s in sessions if s.contains_user(viewer.user_id or "")]

    # --- GET /Sessions -------------------------------------------------------------------

    async def sessions_list(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Sessions``, filtered by ``deviceId``, ``activeWithinSeconds`` and
        ``controllableByUserId``."""
        assert ctx.caller is not None
        sessions = self.visible_sessions(ctx.caller)
        device_id = ctx.first("deviceId")
        if device_id:
            sessions = [s for s in sessions if s.device_id.lower() == device_id.lower()]
        active = self.api.number(ctx, "activeWithinSeconds")
        if active is not None:
            now_ms = self.emu.clock.wall_ms()
            sessions = [s for s in sessions if now_ms - s.last_activity_ms <= active * 1000]
        controllable = ctx.guid("controllableByUserId")
        if controllable is not None:
            # Only sessions that accept remote control; a user without the "control other
            # users" permission (non-admins by default) only their own or user-less ones.
            sessions = [s for s in sessions if s.supports_media_control]
            user = self.emu.users.get(controllable)
            if user is not None and not user.is_admin:
                sessions = [s for s in sessions if not s.user_id or s.contains_user(user.id)]
        return json_response([self.session_dto(s) for s in sessions])

    # --- capabilities, logout, ping ------------------------------------------------------

    async def capabilities(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/Capabilities``: capabilities from the query, 204."""
        session = self._target_session(ctx)
        session.playable_media_types = self._media_types(ctx.array("playableMediaTypes"))
        session.supported_commands = _known(ctx.array("supportedCommands"), GENERAL_COMMANDS)
        session.supports_media_control = bool(ctx.boolean("supportsMediaControl", False))
        self.emu.hub.sessions_changed()
        return no_content()

    async def capabilities_full(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/Capabilities/Full``: a ``ClientCapabilitiesDto`` body, 204."""
        body = {k.lower(): v for k, v in (await self.api.json_body(ctx)).items()}
        session = self._target_session(ctx)
        media = body.get("playablemediatypes") or []
        commands = body.get("supportedcommands") or []
        control = body.get("supportsmediacontrol", False)
        if not isinstance(media, list) or not isinstance(commands, list):
            raise HttpError(400, "The JSON value could not be converted.")
        if not isinstance(control, bool):
            raise HttpError(400, "The JSON value could not be converted.")
        session.playable_media_types = self._media_types([str(m) for m in media])
        session.supported_commands = _known([str(c) for c in commands], GENERAL_COMMANDS)
        session.supports_media_control = control
        self.emu.hub.sessions_changed()
        return no_content()

    def _media_types(self, values: list[str]) -> list[str]:
        if self.api.version.at_least(10, 9):
            return _known(values, MEDIA_TYPES)
        return values

    async def logout(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/Logout``: the caller's token stops working; its session ends."""
        assert ctx.caller is not None
        if not ctx.caller.is_api_key:
            self.emu.revoke_token(ctx.caller.token)
        return no_content()

    async def ping(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /Sessions/Playing/Ping``: keeps the session (and a transcode) alive, 204."""
        self.caller_session(ctx)
        return no_content()

    # --- /PlayingItems -------------------------------------------------------------------

    def _playing_item(self, ctx: Ctx) -> tuple[Session, list[Any], Any]:
        item_id = parse_guid(ctx.params["itemId"])
        session = self.caller_session(ctx)
        users = self.api.session_users(session)
        return session, users, self.emu.library.get(item_id)

    async def playing_item_start(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /PlayingItems/{itemId}``: playback start from query parameters."""
        session, users, item = self._playing_item(ctx)
        method = _known(ctx.array("playMethod"), PLAY_METHODS)
        self.api.note_playing(session, item, 0, paused=False, method=method[0] if method else None)
        self.api.start_playback(users, item)
        return no_content()

    async def playing_item_progress(self, ctx: Ctx) -> web.StreamResponse:
        """``POST /PlayingItems/{itemId}/Progress``: progress from query parameters."""
        session, users, item = self._playing_item(ctx)
        position = self.api.number(ctx, "positionTicks")
        paused = bool(ctx.boolean("isPaused", False))
        self.api.note_playing(session, item, position, paused=paused, method=None)
        self.api.progress_playback(users, item, position)
        return no_content()

    async def playing_item_stopped(self, ctx: Ctx) -> web.StreamResponse:
        """``DELETE /PlayingItems/{itemId}``: playback stopped at ``positionTicks``."""
        session, users, item = self._playing_item(ctx)
        position = self.api.number(ctx, "positionTicks")
        if position is not None and position < 0:
            raise HttpError(400, "PositionTicks must not be negative.")
        self.api.note_stopped(session)
        self.api.stop_playback(users, item, position)
        return no_content()
