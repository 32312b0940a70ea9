"""Catch-up after a gap: scan a user's non-default items on one server and diff them.

Jellyfin keeps no "changed since" for user data and never replays what a closed socket missed,
so after every (re)connect jfsync lists that user's items with non-default data (one listing
per filter: played, favourite, resumable, liked, disliked; Jellyfin ANDs filters, so they are
separate calls), and compares them with the last-known state in the ledger. Any difference is
an observation fed through the same merge path as live events; a known non-default item missing
from every listing was reset on that server, which is a change to the default state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.wire import BaseItemDto
from jfsync.model import DEFAULT_USER_DATA, UserData
from jfsync.sync.ledger import Observation
from jfsync.timing import one_turn

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
#: Items of a whole-user pass worked on between two turns of the event loop while events flow
#: (a millisecond or two of work). A user with 20,000 items of data made each pass of a
#: catch-up 5-20 ms long on a busy 2-core machine, several passes in a row: live events
#: waited 40-70 ms behind them.
PASS_STEP = 500

T = TypeVar("T")


async def in_steps(
    items: Iterable[T],
    pause: Callable[[], Awaitable[None]] | None = None,
    step: int | Callable[[], int] = PASS_STEP,
) -> AsyncIterator[list[T]]:
    """Yield ``items`` in lists of ``step``, awaiting ``pause`` (default: one turn of the event
    loop) before every list but the first. ``step`` may be a callable, asked before each list
    (a catch-up goes in smaller steps once live events flow). What ``items`` iterates must not
    change meanwhile."""
    between = pause or one_turn
    found = iter(items)
    first = True
    while True:
        if not first:
            await between()
        chunk = list(islice(found, step() if callable(step) else step))
        if not chunk:
            return
        first = False
        yield chunk


@dataclass(slots=True)
class Scan:
    """What a catch-up scan found on one server: the user's data by the server's item id and,
    when asked for, the items themselves (what an identity that maps lazily learns from)."""

    states: dict[str, UserData] = field(default_factory=dict)
    items: dict[str, BaseItemDto] = field(default_factory=dict)


async def scan_non_default(
    client: JellyfinClient,
    remote_user_id: str,
    parent_ids: Sequence[str] | None = None,
    *,
    details: bool = True,
    pause: Callable[[], Awaitable[None]] | None = None,
    page_size: int | Callable[[], int] = 1000,
) -> Scan:
    """List the user's leaf items with non-default data.

    With ``parent_ids`` (a library filter: :mod:`jfsync.sync.filters`) only those libraries are
    listed, one listing per library and filter; the others are never read. Without
    ``details`` only the ids and the user's data are read (:meth:`JellyfinClient.iter_user_data`:
    no fields asked for, a few objects kept per item); with it, whole items, kept in
    :attr:`Scan.items`. ``pause`` is awaited before each page (and between the validation
    steps of a page with ``details``): a catch-up gives way to live work there
    (:mod:`jfsync.sync.priority`); ``page_size`` items per request (a callable is asked before
    each page).
    """
    scan = Scan()
    states = scan.states
    parents: Sequence[str | None] = [None] if parent_ids is None else parent_ids
    for parent in parents:
        for name in NON_DEFAULT_FILTERS:
            if pause is not None:
                await pause()
            if not details:
                async for remote, data in client.iter_user_data(
                    remote_user_id,
                    filters=(name,),
                    parent_id=parent,
                    pause=pause,
                    page_size=page_size,
                ):
                    states.setdefault(remote, data)
                continue
            async for item in client.iter_items(
                remote_user_id,
                filters=(name,),
                parent_id=parent,
                pause=pause,
                page_size=page_size,
            ):
                if item.id in states or item.user_data is None:
                    continue
                states[item.id] = item.user_data.to_user_data()
                scan.items[item.id] = item
    return scan


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
    step: int | Callable[[], int] = DIFF_STEP,
    pause: Callable[[], Awaitable[None]] | None = None,
) -> list[Observation]:
    """:func:`catchup_observations`, ``step`` items at a time (a callable is asked before each
    step) with ``pause`` (default: one turn of the event loop) awaited between: a user's whole
    library in one pass held the loop for 80-100 ms at 200,000 items."""
    observations: list[Observation] = []
    async for found in in_steps(scanned.items(), pause, step):
        observations += _differing(server, user, found, known, wall_ms, read_seq)
    await (pause or one_turn)()
    async for held in in_steps(known.items(), pause, step):
        observations += _reset(server, user, held, scanned, wall_ms, read_seq)
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
