"""Catch-up after a gap: scan a user's non-default items on one server and diff them.

Jellyfin keeps no "changed since" for user data and never replays what a closed socket missed,
so after every (re)connect jfsync lists that user's items with non-default data (one listing
per filter: played, favourite, resumable, liked, disliked; Jellyfin ANDs filters, so they are
separate calls), and compares them with the last-known state in the ledger. Any difference is
an observation fed through the same merge path as live events; a known non-default item missing
from every listing was reset on that server, which is a change to the default state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.wire import BaseItemDto
from jfsync.model import DEFAULT_USER_DATA, UserData
from jfsync.sync.ledger import Observation

#: Listings that together cover every item whose user data differs from the default.
NON_DEFAULT_FILTERS: tuple[str, ...] = (
    "IsPlayed",
    "IsFavorite",
    "IsResumable",
    "Likes",
    "Dislikes",
)
#: Items diffed between two turns of the event loop (a few milliseconds of work).
DIFF_STEP = 5000


@dataclass(frozen=True, slots=True)
class ScannedItem:
    """One item found by a catch-up scan, with the user's data on that server."""

    item: BaseItemDto
    data: UserData


async def scan_non_default(
    client: JellyfinClient,
    remote_user_id: str,
    parent_ids: Sequence[str] | None = None,
    *,
    pause: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, ScannedItem]:
    """List the user's leaf items with non-default data, by the server's item id.

    With ``parent_ids`` (a library filter: :mod:`jfsync.sync.filters`) only those libraries are
    listed, one listing per library and filter; the others are never read. ``pause`` is
    awaited before each page and between the validation steps of a page (a catch-up gives
    way to live work there: :mod:`jfsync.sync.priority`).
    """
    found: dict[str, ScannedItem] = {}
    parents: Sequence[str | None] = [None] if parent_ids is None else parent_ids
    for parent in parents:
        for name in NON_DEFAULT_FILTERS:
            if pause is not None:
                await pause()
            async for item in client.iter_items(
                remote_user_id, filters=(name,), parent_id=parent, pause=pause
            ):
                if item.id in found or item.user_data is None:
                    continue
                found[item.id] = ScannedItem(item, item.user_data.to_user_data())
    return found


def catchup_observations(
    server: str,
    user: str,
    scanned: Mapping[str, UserData],
    known: Mapping[str, UserData],
    wall_ms: int,
    read_seq: int | None = None,
) -> list[Observation]:
    """Turn a scan (canonical item -> state) into observations of what differs from ``known``.

    Items whose state equals the last-known one are left out; known items that are not
    default and were not found are observed as reset to the default. ``wall_ms`` must be
    the time the scan was requested, not when it ended: the echo rule matches a scanned
    state only against writes recorded after that time (:func:`jfsync.sync.echo.match_echo`).
    ``read_seq`` is the ledger ticket taken just before the scan was requested (a page older
    than what the ledger learnt of an item since is not applied).
    """
    return _differing(server, user, scanned.items(), known, wall_ms, read_seq) + _reset(
        server, user, known.items(), scanned, wall_ms, read_seq
    )


async def catchup_observations_in_steps(
    server: str,
    user: str,
    scanned: Mapping[str, UserData],
    known: Mapping[str, UserData],
    wall_ms: int,
    read_seq: int | None = None,
    *,
    step: int = DIFF_STEP,
) -> list[Observation]:
    """:func:`catchup_observations`, :data:`DIFF_STEP` items at a time with the event loop
    given back between: a user's whole library in one pass held the loop for 80-100 ms at
    200,000 items."""
    observations: list[Observation] = []
    found = iter(scanned.items())
    while chunk := list(islice(found, step)):
        observations += _differing(server, user, chunk, known, wall_ms, read_seq)
        await asyncio.sleep(0)
    held = iter(known.items())
    while chunk := list(islice(held, step)):
        observations += _reset(server, user, chunk, scanned, wall_ms, read_seq)
        await asyncio.sleep(0)
    return observations


def _differing(
    server: str,
    user: str,
    found: Iterable[tuple[str, UserData]],
    known: Mapping[str, UserData],
    wall_ms: int,
    read_seq: int | None,
) -> list[Observation]:
    """Observations of the ``found`` states that differ from the last-known ones."""
    return [
        Observation(server, user, item, state, wall_ms, "scan", read_seq)
        for item, state in found
        if known.get(item) != state
    ]


def _reset(
    server: str,
    user: str,
    held: Iterable[tuple[str, UserData]],
    scanned: Mapping[str, UserData],
    wall_ms: int,
    read_seq: int | None,
) -> list[Observation]:
    """Observations of the known non-default states (``held``) the scan did not find: reset."""
    return [
        Observation(server, user, item, DEFAULT_USER_DATA, wall_ms, "scan", read_seq)
        for item, state in held
        if item not in scanned and not state.is_default
    ]
