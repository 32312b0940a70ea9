"""The playback tracker: which (user, item) to read from successive session lists (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from jfsync.config import Config
from jfsync.jellyfin.messages import SessionsMessage, parse_message, sessions_start_frame
from jfsync.sync.sessions import PlaybackRead, PlaybackTracker

ALICE = "a" * 32
BOB = "b" * 32
FILM = "f" * 32
OTHER = "e" * 32


def session(
    sid: str = "s1",
    user: str = ALICE,
    item: str | None = FILM,
    position: int = 0,
    checkin: str | None = "2026-12-06T20:00:00.0000000Z",
    extra: tuple[str, ...] = (),
) -> Any:
    """A ``SessionInfoDto`` as Jellyfin sends it in a ``Sessions`` message."""
    dto: dict[str, Any] = {
        "Id": sid,
        "UserId": user,
        "AdditionalUsers": [{"UserId": u, "UserName": "x"} for u in extra],
        "PlayState": {"PositionTicks": position, "IsPaused": False},
    }
    if item is not None:
        dto["NowPlayingItem"] = {"Id": item, "RunTimeTicks": 10**10}
    if checkin is not None:
        dto["LastPlaybackCheckIn"] = checkin
    return dto


def sessions(*dtos: Any) -> Any:
    message = parse_message(SessionsMessage(Data=list(dtos)).model_dump_json(by_alias=True))
    assert isinstance(message, SessionsMessage)
    return message.data


def test_the_sessions_message_parses_what_playback_following_needs() -> None:
    entry = (
        '{"Id":"s1","UserId":"00000000000000000000000000000000","PlayState":null,'
        f'"AdditionalUsers":null,"NowPlayingItem":{{"Id":"{FILM.upper()}"}}}}'
    )
    frame = f'{{"MessageType":"Sessions","Data":[{entry}]}}'
    message = parse_message(frame)
    assert isinstance(message, SessionsMessage)
    (info,) = message.data
    assert info.now_playing_item is not None
    assert info.now_playing_item.id == FILM
    # An API-key session's empty user is nobody.
    assert info.user_ids == ()
    assert sessions_start_frame(1500) == '{"MessageType": "SessionsStart", "Data": "0,1500"}'


def test_a_session_that_stops_playing_or_vanishes_is_read_once() -> None:
    tracker = PlaybackTracker(quiet_s=60)
    assert tracker.update(sessions(session()), 0) == []
    assert tracker.playing == 1
    # Stopped: still there, playing nothing.
    assert tracker.update(sessions(session(item=None)), 5) == [PlaybackRead(ALICE, FILM, "ended")]
    assert tracker.playing == 0
    tracker.update(sessions(session(extra=(BOB,))), 6)
    # Gone (a crashed app's session ends with its socket): every user of it is read.
    assert tracker.update(sessions(), 7) == [
        PlaybackRead(ALICE, FILM, "ended"),
        PlaybackRead(BOB, FILM, "ended"),
    ]
    assert tracker.update(sessions(), 8) == []


def test_switching_to_another_item_reads_the_one_left() -> None:
    tracker = PlaybackTracker(quiet_s=60)
    tracker.update(sessions(session()), 0)
    assert tracker.update(sessions(session(item=OTHER)), 1) == [PlaybackRead(ALICE, FILM, "ended")]


def test_a_session_without_check_ins_goes_quiet_once() -> None:
    tracker = PlaybackTracker(quiet_s=60)
    tracker.update(sessions(session()), 0)
    assert tracker.next_due() == 60
    assert tracker.due(59) == []
    # The feed keeps showing it (with the server's automatic progress), but no check-in.
    tracker.update(sessions(session(position=10**9)), 30)
    assert tracker.due(60) == [PlaybackRead(ALICE, FILM, "quiet")]
    assert tracker.due(500) == []
    assert tracker.next_due() is None
    # A new check-in: it plays again, and the quiet time starts over.
    tracker.update(sessions(session(checkin="2026-12-06T20:05:00.0000000Z")), 600)
    assert tracker.next_due() == 660


def test_live_progress_reads_while_it_plays() -> None:
    tracker = PlaybackTracker(quiet_s=60, live_progress_s=30)
    tracker.update(sessions(session()), 0)
    assert tracker.next_due() == 30
    assert tracker.due(30) == [PlaybackRead(ALICE, FILM, "progress")]
    tracker.update(sessions(session(checkin="2026-12-06T20:00:40.0000000Z")), 40)
    assert tracker.due(59) == []
    assert tracker.due(60) == [PlaybackRead(ALICE, FILM, "progress")]


def test_two_sessions_of_one_user_on_one_item_read_it_once() -> None:
    tracker = PlaybackTracker(quiet_s=60)
    tracker.update(sessions(session("s1"), session("s2")), 0)
    assert tracker.update(sessions(), 1) == [PlaybackRead(ALICE, FILM, "ended")]


def _config(**sync: Any) -> Config:
    servers = [{"name": n, "url": f"http://{n}:8096", "api_key": "0123456789abcdef"} for n in "ab"]
    return Config.model_validate({"servers": servers, "sync": sync})


def test_playback_options_default_and_validate() -> None:
    config = _config()
    assert config.sync.rewatch_protection is True
    assert config.sync.follow_sessions is True
    assert config.sync.session_quiet == 60.0
    assert config.sync.live_progress is None
    assert _config(live_progress="30s").sync.live_progress == 30.0
    with pytest.raises(ValueError, match="at least 5s"):
        _config(live_progress="1s")
