"""A server that keeps sending another user's events or garbage, across reconnects.

The subscriber keeps one limiter per kind for its whole life, so a flood of UserDataChanged for
another user, or of malformed frames, is a few lines and a count a minute, even when the
socket reconnects in between; the user's own events still arrive.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from jfsync.sync.subscriber import Subscriber, SubscriberState
from jfsync.timing import ManualClock, backoff_delays
from tests.subscriber.helpers import IO_TIMEOUT_S, RawServer, Recorder

pytestmark = pytest.mark.timeout(30)

USER_ID = "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
OTHER_ID = "0123456789abcdef0123456789abcdef"
ITEM_ID = "9f86d081884c7d659a2feaa0c55ad015"


def frame(user_id: str, n: int) -> dict[str, object]:
    return {
        "MessageType": "UserDataChanged",
        "MessageId": f"{n:032x}",
        "Data": {"UserId": user_id, "UserDataList": [{"ItemId": ITEM_ID, "PlayCount": n}]},
    }


async def resync() -> None:
    return None


async def token(refresh: bool) -> str:
    return "f00dfeedf00dfeedf00dfeedf00dfeed"


async def test_events_of_another_user_are_summarised_across_reconnects(
    raw_server: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jfsync")
    clock = ManualClock()
    recorder = Recorder()
    sub = Subscriber(
        "alpha",
        raw_server.url,
        USER_ID,
        "alice",
        "dev",
        get_token=token,
        on_event=recorder,
        resync=resync,
        clock=clock,
        delays=lambda: backoff_delays(0.01, 0.01, jitter=0.0),
    )
    sub.start()
    try:
        for round_ in range(2):
            conn = await raw_server.next_connection()
            for n in range(150):
                await conn.send(frame(OTHER_ID, n))
                await conn.send(f"garbage {n} {{")
            await conn.send(frame(USER_ID, 1000 + round_))
            await recorder.wait_user_data(round_ + 1)
            if round_ == 0:
                await conn.close()  # the server drops the socket; the subscriber reconnects
                async with asyncio.timeout(IO_TIMEOUT_S):
                    while sub.status.state is not SubscriberState.BACKOFF:  # noqa: ASYNC110
                        await asyncio.sleep(0)  # loop turns, not time; bounded by timeout
                await clock.advance(1)
        events = recorder.user_data
        assert [e.entries[0].data.play_state.play_count for e in events] == [1000, 1001]
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        lines = [m for m in lines if "more in the last" not in m]  # the counts, below
        other = [m for m in lines if "for another user" in m]
        garbage = [m for m in lines if "websocket frame" in m]
        assert len(other) == 4, other  # three in full and the notice, for 300 events
        assert len(garbage) == 4, garbage
        assert sub.status.state is SubscriberState.CONNECTED
    finally:
        await sub.stop()
    summary = [r.getMessage() for r in caplog.records if "more in the last" in r.getMessage()]
    # The counts: another user's events at stop (one line for both connections), garbage as
    # each socket closes.
    assert next(m for m in summary if "another user" in m).startswith(
        "[alpha/alice] UserDataChanged messages for another user: 297 more in the last"
    )
    garbage_counts = [m.split(": ")[1] for m in summary if "malformed websocket frames" in m]
    assert garbage_counts == [
        "147 more in the last 0 s (latest",
        "150 more in the last 1 s (latest",
    ]
