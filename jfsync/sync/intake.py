"""Intake: what a server tells jfsync becomes ledger observations (events, read-backs, playback).

:class:`Intake` is the first step of the replication core after a socket: it takes a user's
``UserDataChanged`` message, maps its items through the identity, waits for any write of those
items that is under way to be recorded (so its echo is recognised), and applies the entries as
observations in one ledger transaction (echo rule, diff, merge, outbox). An event the echo rule
cannot attribute, and on servers up to 10.10 the other versions of a film sharing one user-data
record, are settled by reading the items back from that server (:meth:`Intake.read_back`),
which is also how playback that ended without a stop is taken in (:meth:`Intake.read_playing`).
What was applied goes to ``after_apply`` (counters, activity, waking the peers' pushers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from jfsync.jellyfin.api import JellyfinClient, parse_version
from jfsync.model import UserData
from jfsync.ratelimit import RepeatLimiter
from jfsync.sync.delivery import Pusher
from jfsync.sync.identity import ItemIdentity
from jfsync.sync.ledger import Applied, Ledger, Observation, Outcome
from jfsync.sync.resetguard import ResetGuard
from jfsync.sync.sessions import PlaybackRead
from jfsync.sync.subscriber import UserDataChangedEvent
from jfsync.timing import Clock

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Counters:
    """Running totals for status and metrics."""

    events_received: int = 0
    entries_received: int = 0
    echoes: int = 0
    changes_applied: int = 0
    scans: int = 0
    scan_changes: int = 0
    #: Items read back from a server after an event: the echo rule could not attribute the
    #: event, or the item shares its user-data record with the one pushed (versions, <=10.10).
    read_backs: int = 0


class IntakeLink(Protocol):
    """What intake needs of one configured server (``jfsync.service.ServerLink``)."""

    @property
    def name(self) -> str: ...
    @property
    def client(self) -> JellyfinClient: ...
    @property
    def pusher(self) -> Pusher: ...
    @property
    def version(self) -> str | None: ...
    @property
    def user_keys(self) -> Mapping[str, str]: ...


class Intake:
    """Turn what the servers report into ledger observations."""

    def __init__(
        self,
        links: Mapping[str, IntakeLink],
        *,
        ledger: Ledger,
        identity: ItemIdentity,
        clock: Clock,
        reset_guard: ResetGuard,
        counters: Counters,
        after_apply: Callable[[list[Applied]], None],
    ) -> None:
        self._links = links
        self._ledger = ledger
        self._identity = identity
        self._clock = clock
        self._reset_guard = reset_guard
        self.counters = counters
        self._after_apply = after_apply
        #: Per server: events of users jfsync does not sync, logged in moderation.
        self._unknown_users: dict[str, RepeatLimiter] = {}

    async def user_data(self, event: UserDataChangedEvent) -> None:
        """Apply one ``UserDataChanged`` message of one (server, user) socket."""
        link = self._links[event.server]
        user = link.user_keys.get(event.user_id)
        self.counters.events_received += 1
        if user is None:
            # A subscriber whose user is no longer synced (unmatched since): say so, in moderation.
            limiter = self._unknown_users.get(link.name)
            if limiter is None:
                limiter = self._unknown_users[link.name] = RepeatLimiter(
                    logger, self._clock, f"[{link.name}] events of users not synced"
                )
            limiter.log(
                "[%s] ignored an event of user %s, who is not synced (not matched on another "
                "server, or excluded)",
                link.name,
                event.user_id,
            )
            return
        if self._reset_guard.is_held(link.name, user):
            return
        entries = event.item_entries
        self.counters.entries_received += len(entries)
        items = await self._identity.canonical_items(link.name, [e.item_id for e in entries])
        # An echo of a write whose answer jfsync has not recorded yet must wait for it.
        await link.pusher.settled((user, item) for item in items.values())
        now_ms = self._clock.wall_ms()
        observations = [
            Observation(link.name, user, items[e.item_id], e.data, now_ms, "event")
            for e in entries
            if e.item_id in items
        ]
        applied = await self._ledger.apply_observations(observations)
        self._after_apply(applied)
        unsure = {a.observation.item for a in applied if a.outcome is Outcome.AMBIGUOUS}
        remote = {r: key for r, key in items.items() if key in unsure}
        remote.update(await self._shared_records(link, [e.item_id for e in entries]))
        if remote:
            await self.read_back(link, event.user_id, user, remote)

    async def _shared_records(self, link: IntakeLink, pushed: list[str]) -> dict[str, str]:
        """Items that share a user-data record with an item just pushed, but were not pushed.

        Up to Jellyfin 10.10 two versions of a film (same provider ids) share one record: a
        change through one version also changes the other, with no push for it, and only one
        of them can be matched to the film on the other servers (two candidates are refused,
        never guessed). The versions not pushed are read back.
        """
        if not _shares_records(link.version) or not pushed:
            return {}
        siblings = await self._identity.siblings(link.name, pushed)
        others = {other for found in siblings.values() for other in found} - set(pushed)
        if not others:
            return {}
        return await self._identity.canonical_items(link.name, sorted(others))

    async def read_back(
        self,
        link: IntakeLink,
        remote_user_id: str,
        user: str,
        items: dict[str, str],
        why: str = "an ambiguous event",
    ) -> None:
        """Settle events the echo rule cannot attribute: read the items and apply the read.

        Such an event equals a state jfsync's write replaced or an older write (a stale
        event, or the user taking the write back inside the debounce): the server's current
        state says which. The read is requested after the event arrived (and after any write
        of these items under way was recorded), so it is at least as fresh as the event.
        ``items`` maps the server's item ids to canonical keys.
        """
        await link.pusher.settled((user, item) for item in items.values())
        read_ms = self._clock.wall_ms()
        read_seq = self._ledger.ticket()
        states: dict[str, UserData] = {}
        async for found in link.client.iter_items(
            remote_user_id, ids=list(items), fields=(), include_types=(), recursive=True
        ):
            key = items.get(found.id)
            if key is not None and found.user_data is not None:
                states[key] = found.user_data.to_user_data()
        self.counters.read_backs += len(items)
        applied = await self._ledger.apply_observations(
            [
                Observation(link.name, user, k, v, read_ms, "read", read_seq)
                for k, v in states.items()
            ]
        )
        logger.debug(
            "[%s] read back %d items of user %s after %s: %s",
            link.name,
            len(items),
            user,
            why,
            ", ".join(a.outcome.value for a in applied),
        )
        self._after_apply(applied)

    async def read_playing(self, server: str, reads: list[PlaybackRead]) -> None:
        """Read what a playback that ended, went quiet or goes on left on ``server``.

        Progress is saved without a push (a crashed player's position, a Played mark past
        90 %): the read is applied like any read, so echoes, merge and rewatch rules hold.
        """
        link = self._links[server]
        by_user: dict[str, list[str]] = {}
        for read in reads:
            if read.user_id in link.user_keys:
                by_user.setdefault(read.user_id, []).append(read.item_id)
        for remote_user, item_ids in by_user.items():
            user = link.user_keys.get(remote_user)
            if user is None or self._reset_guard.is_held(link.name, user):
                continue
            items = await self._identity.canonical_items(link.name, item_ids)
            if items:
                await self.read_back(link, remote_user, user, items, why="playback")


def _shares_records(version: str | None) -> bool:
    """Tell whether a Jellyfin version keeps one user-data record for items with the same
    provider ids (10.8 to 10.10; from 10.11 records are per item)."""
    parsed = parse_version(version) if version is not None else None
    return parsed is not None and parsed[:2] < (10, 11)
