"""Parsing websocket frames: the shapes Jellyfin sends, tolerance, and malformed frames."""

from __future__ import annotations

import json
from collections.abc import Generator
from datetime import UTC, datetime

import pytest

from jfsync.jellyfin.messages import (
    ForceKeepAliveMessage,
    KeepAliveMessage,
    LibraryChangedMessage,
    MalformedMessageError,
    Message,
    ServerRestartingMessage,
    ServerShuttingDownMessage,
    UnknownMessage,
    UserDataChangedMessage,
    parse_message,
    parse_message_decoded_steps,
    parse_message_steps,
)
from jfsync.model import PlayState, UserData

# The fact sheet's §2.2 example, verbatim apart from the dashed UserId (inputs may be dashed).
USER_DATA_CHANGED = {
    "MessageType": "UserDataChanged",
    "Data": {
        "UserId": "4bd7d5a1-e0c4-4f6a-9b0d-3c2e1f0a9b8c",
        "UserDataList": [
            {
                "PlaybackPositionTicks": 0,
                "PlayCount": 1,
                "IsFavorite": False,
                "LastPlayedDate": "2025-03-01T20:15:42.1234567Z",
                "Played": True,
                "Key": "81189001002",
                "ItemId": "9F86D081884C7D659A2FEAA0C55AD015",
            },
            {
                "UnplayedItemCount": 6,
                "PlaybackPositionTicks": 0,
                "PlayCount": 0,
                "IsFavorite": False,
                "Played": False,
                "Key": "season",
                "ItemId": "1b4f0e9851971998e732078544c96b36",
                "SomethingNew": {"x": 1},
            },
            None,
        ],
    },
    "MessageId": "a3c1e5b2d4f64a7e8c9b0d1e2f3a4b5c",
}


def test_user_data_changed_parses_normalises_ids_and_drops_null_entries() -> None:
    message = parse_message(json.dumps(USER_DATA_CHANGED))
    assert isinstance(message, UserDataChangedMessage)
    assert message.data.user_id == "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
    episode, season = message.data.user_data_list
    assert episode.item_id == "9f86d081884c7d659a2feaa0c55ad015"
    assert episode.to_user_data() == UserData(
        favorite=False,
        rating=None,
        play_state=PlayState(
            played=True,
            play_count=1,
            last_played_s=int(datetime(2025, 3, 1, 20, 15, 42, tzinfo=UTC).timestamp()),
            position_ticks=0,
        ),
    )
    assert season.unplayed_item_count == 6
    assert message.message_id == "a3c1e5b2d4f64a7e8c9b0d1e2f3a4b5c"


def test_keepalive_family_and_server_lifecycle_messages() -> None:
    force = parse_message('{"MessageType":"ForceKeepAlive","Data":60,"MessageId":"ab"}')
    assert isinstance(force, ForceKeepAliveMessage)
    assert force.timeout_s == 60
    assert isinstance(parse_message('{"MessageType":"KeepAlive"}'), KeepAliveMessage)
    assert isinstance(parse_message('{"MessageType":"ServerRestarting"}'), ServerRestartingMessage)
    assert isinstance(
        parse_message(b'{"MessageType":"ServerShuttingDown","Data":null}'),
        ServerShuttingDownMessage,
    )


def test_library_changed_reads_every_list_and_tolerates_nulls() -> None:
    frame = {
        "MessageType": "LibraryChanged",
        "Data": {
            "ItemsAdded": ["9f86d081-884c-7d65-9a2f-eaa0c55ad015"],
            "ItemsRemoved": ["1b4f0e9851971998e732078544c96b36"],
            "ItemsUpdated": None,
            "FoldersAddedTo": [],
            "CollectionFolders": ["0123456789abcdef0123456789abcdef"],
            "IsEmpty": False,
        },
    }
    message = parse_message(json.dumps(frame))
    assert isinstance(message, LibraryChangedMessage)
    assert message.data.items_added == ("9f86d081884c7d659a2feaa0c55ad015",)
    assert message.data.items_removed == ("1b4f0e9851971998e732078544c96b36",)
    assert message.data.items_updated == ()
    assert message.data.collection_folders == ("0123456789abcdef0123456789abcdef",)
    empty = parse_message('{"MessageType":"LibraryChanged","Data":null}')
    assert isinstance(empty, LibraryChangedMessage)
    assert empty.data.items_added == ()


def test_unknown_types_parse_to_unknown_message() -> None:
    frame = '{"MessageType":"ActivityLogEntry","Data":[{"Id":"x"}],"MessageId":"m"}'
    message = parse_message(frame)
    assert isinstance(message, UnknownMessage)
    assert message.message_type == "ActivityLogEntry"
    assert message.data == [{"Id": "x"}]


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        ("not json at all", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"Data": 1}', "no MessageType"),
        ('{"MessageType": 7}', "no MessageType"),
        ('{"MessageType":"UserDataChanged","Data":{"UserId":"nope"}}', "Data.UserId"),
        ('{"MessageType":"UserDataChanged"}', "Data"),
        (
            '{"MessageType":"UserDataChanged","Data":{"UserId":"' + "a" * 32 + '",'
            '"UserDataList":[{"PlayCount":"many"}]}}',
            "PlayCount",
        ),
        ('{"MessageType":"LibraryChanged","Data":{"ItemsAdded":["zz"]}}', "ItemsAdded"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_frames_raise_a_specific_error(frame: str | bytes, fragment: str) -> None:
    with pytest.raises(MalformedMessageError) as info:
        parse_message(frame)
    assert fragment in str(info.value)


def _run_steps(steps: Generator[None, None, Message]) -> Message | MalformedMessageError:
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value
    except MalformedMessageError as err:
        return err


BULK_FRAME = json.dumps(
    {
        **USER_DATA_CHANGED,
        "Data": {
            "UserId": "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c",
            "UserDataList": USER_DATA_CHANGED["Data"]["UserDataList"] * 300,  # type: ignore[index]
        },
    }
)


@pytest.mark.parametrize(
    "frame",
    [
        BULK_FRAME,
        BULK_FRAME.encode(),
        json.dumps(USER_DATA_CHANGED),
        BULK_FRAME.replace('"PlayCount": 0', '"PlayCount": "many"', 1),
        BULK_FRAME[:-2],
        b"\xff" + BULK_FRAME.encode(),
    ],
    ids=["bulk", "bulk bytes", "small", "bad entry", "cut short", "not UTF-8"],
)
def test_a_bulk_frame_decoded_at_once_parses_as_when_walked(frame: str | bytes) -> None:
    """A frame of a few MiB is decoded at once and validated in steps: the same message, or
    the same kind of error, as the walked parse and the one-go parse."""
    decoded = _run_steps(parse_message_decoded_steps(frame, step=7))
    walked = _run_steps(parse_message_steps(frame, step=7))
    try:
        whole: Message | MalformedMessageError = parse_message(frame)
    except MalformedMessageError as err:
        whole = err
    if isinstance(whole, MalformedMessageError):
        assert isinstance(decoded, MalformedMessageError)
        assert isinstance(walked, MalformedMessageError)
        assert str(decoded) == str(walked)
    else:
        assert decoded == walked == whole
