"""Last played dates: compared and written at whole seconds, the same way on every path.

The decision (docs/design-notes.md, "Dates at one-second resolution"): jfsync keeps dates as
whole UTC seconds, floored. A peer gets the second the user played in (10.132 is written as
10.000); what it writes always compares equal to what it meant to write, and a source holding
10.132 while its peers hold 10.000 counts as in sync, so nothing is written again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfsync.jellyfin.wire import UserItemDataDto, format_date, update_body
from jfsync.model import PlayState, UserData, datetime_to_s
from tests.replication.conftest import MakeCluster

pytestmark = pytest.mark.timeout(30)

PLAYED_AT = datetime(2026, 3, 1, 20, 15, 10, 132_000, UTC)
#: .NET's DateTime.MinValue and MaxValue, as naive datetimes (hypothesis draws naive ones).
EARLIEST = datetime(1, 1, 1)  # noqa: DTZ001 - made UTC in the test
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999_999)  # noqa: DTZ001 - made UTC in the test


async def test_a_play_at_10_132_reaches_the_peers_as_10_000_and_stays_put(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(3)
    a, b, c = cluster.emus
    item = cluster.free_items[0]
    cluster.change(a, item, played=True, play_count=1, last_played=PLAYED_AT)
    whole = int(PLAYED_AT.replace(microsecond=0).timestamp())
    expected = UserData(play_state=PlayState(True, 1, whole, 0))
    await cluster.wait_all_hold(item, expected)
    # The user's server keeps the exact time; the peers show the same second.
    assert cluster.emu("a").stored_user_data(cluster.uid(a), item).last_played == PLAYED_AT
    for peer in (b, c):
        stored = peer.stored_user_data(cluster.uid(peer), item).last_played
        assert stored == PLAYED_AT.replace(microsecond=0)
    # One write per peer, and none back to the source: 10.132 and 10.000 are the same second.
    await cluster.settle()
    assert len(cluster.writes(b, [item])) == 1
    assert len(cluster.writes(c, [item])) == 1
    assert cluster.writes(a, [item]) == []
    # A full reconcile reads every server again and finds nothing to change.
    assert cluster.service.reconciler is not None
    report = await cluster.service.reconciler.reconcile()
    assert report.errors == []
    assert report.changed == 0
    await cluster.settle()
    assert len(cluster.writes(b, [item])) == 1
    assert cluster.writes(a, [item]) == []


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=EARLIEST, max_value=LATEST))
def test_what_is_written_reads_back_as_the_same_second(moment: datetime) -> None:
    exact = moment.replace(tzinfo=UTC)
    read = UserItemDataDto.model_validate({"LastPlayedDate": format_date(exact), "Played": True})
    seconds = read.to_user_data().play_state.last_played_s
    assert seconds == datetime_to_s(exact)
    body = update_body(read.to_user_data())
    written = UserItemDataDto.model_validate({"LastPlayedDate": body["LastPlayedDate"]})
    # Writing is a fixpoint of comparison: what jfsync writes compares equal to what it meant.
    assert written.to_user_data().play_state.last_played_s == seconds
    # Floored: never later than the user's time, less than a second before it.
    assert written.last_played_date is not None
    assert timedelta(0) <= exact - written.last_played_date < timedelta(seconds=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01T20:15:42.9999999Z", "2025-03-01T20:15:42.0000000Z"),
        ("9999-12-31T23:59:59.9999999Z", "9999-12-31T23:59:59.0000000Z"),
        ("0001-01-01T00:00:00.5000000Z", "0001-01-01T00:00:00.0000000Z"),
        ("1969-12-31T23:59:59.5000000Z", "1969-12-31T23:59:59.0000000Z"),
    ],
    ids=["just_before_a_second", "dotnet_max_value", "dotnet_min_value", "before_1970"],
)
def test_edge_dates_floor_to_their_own_second(text: str, expected: str) -> None:
    dto = UserItemDataDto.model_validate({"LastPlayedDate": text, "Played": True})
    assert update_body(dto.to_user_data())["LastPlayedDate"] == expected
