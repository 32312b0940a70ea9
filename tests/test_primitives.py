"""Shared primitives: id normalisation and derivation, the manual clock, backoff, wire dates."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest

from jfsync.ids import InvalidIdError, derive_item_id, normalize_id, session_id
from jfsync.jellyfin.wire import UserItemDataDto, format_date, update_body
from jfsync.model import PlayState, Stamp, UserData
from jfsync.timing import ManualClock, backoff_delays


def test_ids_normalise_dashed_and_upper_case() -> None:
    assert (
        normalize_id("4BD7D5A1-E0C4-4F6A-9B0D-3C2E1F0A9B8C") == "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
    )
    assert normalize_id("4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c") == "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
    with pytest.raises(InvalidIdError, match="not a Jellyfin id: 'nope'"):
        normalize_id("nope")


def test_item_id_derivation_is_jellyfins_md5_of_utf16_type_and_path() -> None:
    # Same type and path give the same id on every server; any difference changes it.
    a = derive_item_id("Movie", "/media/movies/A (2000)/A (2000).mkv")
    assert a == derive_item_id(
        "MediaBrowser.Controller.Entities.Movies.Movie", "/media/movies/A (2000)/A (2000).mkv"
    )
    assert a != derive_item_id("Movie", "/mnt/movies/A (2000)/A (2000).mkv")
    assert a != derive_item_id("Episode", "/media/movies/A (2000)/A (2000).mkv")
    assert len(a) == 32
    assert int(a, 16) >= 0
    assert session_id("jfsync", "dev-1") != session_id("jfsync", "dev-2")


async def test_manual_clock_wakes_sleepers_in_order_only_when_advanced() -> None:
    clock = ManualClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    async with asyncio.TaskGroup() as group:
        group.create_task(sleeper("late", 30))
        group.create_task(sleeper("early", 10))
        await clock.wait_for_sleepers(2)
        assert clock.pending_sleeps == [10, 30]
        await clock.advance(9.999)
        assert woke == []
        await clock.advance(0.001)
        assert woke == ["early"]
        await clock.advance(20)
        assert woke == ["early", "late"]


def test_backoff_is_capped_exponential_with_bounded_jitter() -> None:
    plain = backoff_delays(base_s=1, cap_s=10, jitter=0)
    assert [next(plain) for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    jittered = backoff_delays(base_s=1, cap_s=10, jitter=0.2, rng=random.Random(3))
    for expected in [1, 2, 4, 8, 10, 10, 10]:
        delay = next(jittered)
        assert expected * 0.8 <= delay <= min(10, expected * 1.2)


def test_stamp_orders_by_time_then_server_rank() -> None:
    assert Stamp.observed(10, 1) > Stamp.observed(9, 0)
    # Exact tie: the server earlier in the config wins.
    assert Stamp.observed(10, 0) > Stamp.observed(10, 1)


def test_wire_user_data_round_trip_to_domain() -> None:
    dto = UserItemDataDto.model_validate(
        {
            "Rating": 8.5,
            "PlaybackPositionTicks": 120_000_000,
            "PlayCount": 2,
            "IsFavorite": True,
            "Likes": True,
            "LastPlayedDate": "2025-03-01T20:15:42.1234567Z",
            "Played": False,
            "Key": "603",
            "ItemId": "9F86D081-884C-7D65-9A2F-EAA0C55AD015",
            "SomethingNew": 1,
        }
    )
    assert dto.item_id == "9f86d081884c7d659a2feaa0c55ad015"
    data = dto.to_user_data()
    when = int(datetime(2025, 3, 1, 20, 15, 42, tzinfo=UTC).timestamp())
    assert data == UserData(
        favorite=True,
        rating=8.5,
        play_state=PlayState(
            played=False, play_count=2, last_played_s=when, position_ticks=120_000_000
        ),
    )
    assert (
        format_date(datetime(2025, 3, 1, 20, 15, 42, tzinfo=UTC)) == "2025-03-01T20:15:42.0000000Z"
    )
    body = update_body(data)
    assert body == {
        "IsFavorite": True,
        "Rating": 8.5,
        "Played": False,
        "PlayCount": 2,
        "PlaybackPositionTicks": 120_000_000,
        "LastPlayedDate": "2025-03-01T20:15:42.0000000Z",
    }
    assert update_body(UserData(), frozenset({"favorite"})) == {"IsFavorite": False}


def test_secret_scrubber_and_failure_streak(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from jfsync.logs import FailureStreak, SecretScrubber

    logger = logging.getLogger("jfsync.test")
    scrubber = SecretScrubber(["tok-123456"])
    logger.addFilter(scrubber)
    clock = ManualClock()
    streak = FailureStreak(logger, "b", clock)
    try:
        with caplog.at_level(logging.DEBUG, logger="jfsync.test"):
            streak.failed("write", "refused for tok-123456")
            streak.failed("write", "refused again")
            streak.succeeded("writes work")
    finally:
        logger.removeFilter(scrubber)
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert levels == [
        ("WARNING", "[b] write: refused for ***"),
        ("DEBUG", "[b] write: refused again"),
        ("INFO", "[b] writes work again after 0.0 s and 2 failures"),
    ]
