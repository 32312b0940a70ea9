"""RepeatLimiter: a flood of one warning is the first few lines, then one count a minute."""

from __future__ import annotations

import logging

import pytest

from jfsync.ratelimit import RepeatLimiter
from jfsync.timing import ManualClock

pytestmark = pytest.mark.timeout(10)

LOGGER = logging.getLogger("tests.hostile.ratelimit")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


async def test_a_flood_is_three_lines_then_one_summary_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER.name)
    clock = ManualClock()
    limiter = RepeatLimiter(LOGGER, clock, "[a/alice] malformed frames")
    for i in range(961):  # a minute of garbage, 16 frames a second, and one more
        limiter.log("skipped frame %d", i)
        await clock.advance(1 / 16)
    # Three in full, one saying the rest are counted, then the minute's count.
    assert lines(caplog)[:3] == ["skipped frame 0", "skipped frame 1", "skipped frame 2"]
    assert "more are counted, with one summary line per 60 s" in lines(caplog)[3]
    assert len(lines(caplog)) == 5
    assert lines(caplog)[4].startswith("[a/alice] malformed frames: 957 more in the last 60 s")
    assert "(latest: skipped frame 959)" in lines(caplog)[4]
    assert limiter.total == 961
    assert limiter.suppressed == 1  # the one after the minute waits for the next summary


async def test_after_a_quiet_minute_the_next_one_is_logged_in_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER.name)
    clock = ManualClock()
    limiter = RepeatLimiter(LOGGER, clock, "events of unknown users", burst=1)
    limiter.log("event of u1")
    limiter.log("event of u2")  # counted
    await clock.advance(61)
    limiter.log("event of u3")  # reports u2's minute, keeps counting: the flood goes on
    await clock.advance(61)
    limiter.log("event of u4")  # reports u3's minute
    await clock.advance(61)
    limiter.flush()
    await clock.advance(120)
    limiter.log("event of u5")  # a quiet stretch before it: in full again
    got = lines(caplog)
    assert got[0] == "event of u1"
    assert got[2].endswith("1 more in the last 61 s (latest: event of u2)")
    assert got[3].endswith("1 more in the last 61 s (latest: event of u3)")
    assert got[4].endswith("1 more in the last 61 s (latest: event of u4)")
    assert got[5] == "event of u5"
    assert len(got) == 7  # u5 is the burst of its new window, so the "counted" notice again


def test_flush_with_nothing_counted_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER.name)
    limiter = RepeatLimiter(LOGGER, ManualClock(), "x")
    limiter.log("once")
    limiter.flush()
    assert lines(caplog) == ["once"]
