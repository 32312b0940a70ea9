"""Intake: what a server tells jfsync becomes ledger observations (events, read-backs, playback).

:class:`Intake` is the first step of the replication core after a socket: it takes a user's
``UserDataChanged`` message, maps its items through the identity, waits for any write of those
items that is under way to be recorded (so its echo is recognised), and applies the entries as
observations (echo rule, diff, merge, outbox), a slice of them per ledger transaction. An event
the echo rule cannot attribute, and on servers up to 10.10 the other versions of a film sharing
one user-data record, are settled by reading the items back from that server
(:meth:`Intake.read_back`), which is also how playback that ended without a stop is taken in
(:meth:`Intake.read_playing`).
What was applied goes to ``after_apply`` (counters, activity, waking the peers' pushers).

A message is applied in slices (:data:`FIRST_SLICE`, then :data:`SLICE` entries per
transaction): after a bulk action on a large library (one message of ten thousand entries) the
first slice's writes leave while the rest is still being applied, and an event of another
server, or a pusher's round, waits for one slice, never for the whole message. Order per item
is kept: entries not applied yet stay registered by (user, item), and whoever applies something
of the same item first (a later message, a pusher about to compare, a catch-up) applies them
before it (:meth:`Intake.apply_ahead`), so the user's last action still wins.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from jfsync.jellyfin.api import JellyfinClient, parse_version
from jfsync.model import UserData
from jfsync.ratelimit import RepeatLimiter
from jfsync.sync.delivery import Pusher
from jfsync.sync.identity import ItemIdentity
from jfsync.sync.ledger import Applied, Ledger, Observation, OutboxRow, Outcome
from jfsync.sync.priority import LiveFirst
from jfsync.sync.resetguard import ResetGuard
from jfsync.sync.sessions import PlaybackRead
from jfsync.sync.subscriber import UserDataChangedEvent, UserDataEntry
from jfsync.timing import Clock

logger = logging.getLogger(__name__)

#: Entries of a message applied in its first transaction: small, so that the first writes of
#: a bulk action leave early.
FIRST_SLICE = 100
#: Entries applied per transaction after the first: a few milliseconds of work each, so that
#: nothing waits long behind a message of thousands of entries.
SLICE = 250
#: Entries of a bulk message mapped and registered at a time (a few milliseconds of work; the
#: event loop is given back between).
MAP_STEP = 2000


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


class _Entry(NamedTuple):
    """One entry of a message, waiting to be applied: the server's ids and the canonical item.

    A tuple: a bulk action makes ten thousand of them at once.
    """

    server: str
    remote_user: str
    remote_item: str
    item: str
    data: UserData


@dataclass(slots=True)
class _Unapplied:
    """Entries not applied yet, by canonical item (in order), of one user.

    Registered in :attr:`Intake._held` under (user, item) for as long as they are neither
    applied nor in a transaction on its way: whoever needs an item applied first moves its
    entries over to itself, synchronously, so they are never out of sight.
    """

    user: str
    groups: dict[str, list[_Entry]] = field(default_factory=dict)


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
        request_catch_up: Callable[[str, str], None] | None = None,
        live: LiveFirst | None = None,
    ) -> None:
        self._links = links
        self._ledger = ledger
        self._identity = identity
        self._clock = clock
        self._reset_guard = reset_guard
        self.counters = counters
        self._after_apply = after_apply
        #: Told (server, user) when entries could not be applied (a catch-up finds them).
        self._request_catch_up = request_catch_up
        #: Per server: events of users jfsync does not sync, logged in moderation.
        self._unknown_users: dict[str, RepeatLimiter] = {}
        #: (user, item) -> the entries of that item received but not applied yet.
        self._held: dict[tuple[str, str], _Unapplied] = {}
        #: Per user: done once the last bulk message received has registered its entries.
        self._registering: dict[str, asyncio.Future[None]] = {}
        #: Told of events and of their applies: catch-ups give way to them.
        self._live = live

    async def user_data(self, event: UserDataChangedEvent) -> None:
        """Apply one ``UserDataChanged`` message of one (server, user) socket."""
        if self._live is None:
            await self._user_data(event)
            return
        with self._live.working():
            await self._user_data(event)

    async def _user_data(self, event: UserDataChangedEvent) -> None:
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
        if self._live is not None:
            self._live.event()
        # A bulk message comes with most of its entries not converted yet: they are
        # converted (and mapped) a step at a time after its first slice is applied.
        steps = event.item_steps()
        first: list[UserDataEntry] = await anext(steps, [])
        self.counters.entries_received += len(first)
        pushed = [e.item_id for e in first]
        mine = _Unapplied(user)
        head, spill = first[:FIRST_SLICE], first[FIRST_SLICE:]
        bulk = bool(spill or event.rest)
        # A bulk message takes longer to map than a small one received after it: that one
        # must not apply an item before the bulk one has registered it (the older entry would
        # land last and win). So a message waits for the bulk message of the same user still
        # registering when it arrived, if any (small ones map fast; waiting for every earlier
        # message would hold all servers' events behind one server's slow mapping).
        earlier = self._registering.get(user)
        registered: asyncio.Future[None] | None = None
        if bulk:
            registered = self._registering[user] = asyncio.get_running_loop().create_future()
        try:
            mapped = await self._map(link.name, event.user_id, head)
            if earlier is not None and not earlier.done():
                await asyncio.shield(earlier)
            self._register(mine, mapped)
            if bulk:
                # A bulk action: its first slice is applied (and its writes leave) before the
                # rest of it is even converted and mapped.
                await self._drain(mine, FIRST_SLICE, once=True)
                await self._register_steps(mine, event.user_id, link.name, spill, steps, pushed)
        finally:
            await steps.aclose()
            if registered is not None:
                registered.set_result(None)
                if self._registering.get(user) is registered:
                    del self._registering[user]
        await self._drain(mine, SLICE if bulk else FIRST_SLICE)
        remote = await self._shared_records(link, pushed)
        if remote:
            await self.read_back(link, event.user_id, user, remote)

    async def _register_steps(
        self,
        held: _Unapplied,
        remote_user: str,
        server: str,
        spill: list[UserDataEntry],
        steps: AsyncGenerator[list[UserDataEntry]],
        pushed: list[str],
    ) -> None:
        """Map and register the rest of a bulk message: ``spill`` (converted already), then
        each step of ``steps`` as it is converted, :data:`MAP_STEP` entries at a time;
        ``pushed`` gets their item ids."""
        chunk: list[UserDataEntry] | None = spill
        while chunk is not None:
            for start in range(0, len(chunk), MAP_STEP):
                part = chunk[start : start + MAP_STEP]
                self._register(held, await self._map(server, remote_user, part))
            chunk = await anext(steps, None)
            if chunk is not None:
                self.counters.entries_received += len(chunk)
                pushed += [e.item_id for e in chunk]

    @property
    def unapplied(self) -> int:
        """Entries received and not applied yet."""
        return sum(len(self._held[key].groups.get(key[1], ())) for key in self._held)

    async def apply_ahead(self, keys: Iterable[tuple[str, str]]) -> None:
        """Apply now what was received of these (user, item) keys and is not applied yet.

        Call it before applying anything else of those items that was learnt later (a
        pusher's compare read, a catch-up scan): the older entries of a message still being
        applied in slices must not land after it. Returns at once when nothing is waiting.
        """
        ahead: dict[str, _Unapplied] = {}
        for user, item in keys:
            if (user, item) in self._held:
                held = ahead.get(user)
                if held is None:
                    held = ahead[user] = _Unapplied(user)
                self._adopt(held, item)
        for held in ahead.values():
            await self._drain(held, SLICE)

    async def apply_ahead_of_user(self, user: str) -> None:
        """:meth:`apply_ahead` for every item of ``user`` (before a catch-up of that user).

        A bulk message of ``user`` whose entries are still being converted and mapped is
        waited for first (a few milliseconds per thousand entries): an entry registered only
        after the catch-up's scan would land after it, older than what the scan found.
        """
        registering = self._registering.get(user)
        if registering is not None and not registering.done():
            await asyncio.shield(registering)
        await self.apply_ahead([key for key in self._held if key[0] == user])

    async def _map(
        self, server: str, remote_user: str, entries: Sequence[UserDataEntry]
    ) -> list[_Entry]:
        """The entries whose items map to canonical items (the others are not synced)."""
        items = await self._identity.canonical_items(server, [e.item_id for e in entries])
        return [
            _Entry(server, remote_user, e.item_id, items[e.item_id], e.data)
            for e in entries
            if e.item_id in items
        ]

    def _register(self, held: _Unapplied, entries: list[_Entry]) -> None:
        """Register ``entries`` as ``held``'s (in order, after any older ones of their items)."""
        groups = held.groups
        for entry in entries:
            group = groups.get(entry.item)
            if group is None:
                group = self._adopt(held, entry.item)
            group.append(entry)

    def _adopt(self, held: _Unapplied, item: str) -> list[_Entry]:
        """Register ``item`` as ``held``'s, taking over the entries of it not applied yet."""
        key = (held.user, item)
        group = held.groups.get(item)
        if group is None:
            before = self._held.get(key)
            older = before.groups.pop(item, []) if before is not None and before is not held else []
            group = held.groups[item] = older
        self._held[key] = held
        return group

    async def _drain(self, held: _Unapplied, first: int, *, once: bool = False) -> None:
        """Apply ``held``'s entries in slices (``first`` entries, then :data:`SLICE`; with
        ``once`` only the first), then read back what the echo rule could not attribute."""
        unsure: list[_Entry] = []
        size = first
        slices = 0
        try:
            while held.groups and not (once and slices):
                slices += 1
                peek = _first_groups(held.groups, size)
                size = SLICE
                # An echo of a write whose answer jfsync has not recorded yet must wait for it.
                await self._settled(held.user, [e for item in peek for e in held.groups[item]])
                # Whatever another message or a pusher took over meanwhile is theirs now.
                batch: list[_Entry] = []
                for item in peek:
                    group = held.groups.pop(item, None)
                    if group is not None:
                        if self._held.get((held.user, item)) is held:
                            del self._held[(held.user, item)]
                        batch += group
                if not batch:
                    continue
                # No await from here until the transaction is queued: the ledger's lock is
                # FIFO, so whoever finds these items gone applies after them.
                now_ms = self._clock.wall_ms()
                # A few changes (the user's clicks): the transaction also reads what is due
                # for the peers it queued for, and their pushers start from that.
                due: dict[str, list[OutboxRow]] | None = (
                    {} if len(batch) < Pusher.LIVE_ROWS else None
                )
                applied = await self._ledger.apply_observations(
                    [
                        Observation(e.server, held.user, e.item, e.data, now_ms, "event")
                        for e in batch
                    ],
                    due=due,
                    due_limit=Pusher.LIVE_ROWS,
                )
                if due:
                    for peer, rows in due.items():
                        link = self._links.get(peer)
                        if link is not None:
                            link.pusher.offer(rows)
                self._after_apply(applied)
                unsure += [
                    e for e, a in zip(batch, applied, strict=True) if a.outcome is Outcome.AMBIGUOUS
                ]
        except BaseException as err:
            self._give_up(held, cancelled=isinstance(err, asyncio.CancelledError))
            raise
        by_source: dict[tuple[str, str], dict[str, str]] = {}
        for e in unsure:
            by_source.setdefault((e.server, e.remote_user), {})[e.remote_item] = e.item
        for (server, remote_user), remote in by_source.items():
            link = self._links.get(server)
            if link is not None:
                await self.read_back(link, remote_user, held.user, remote)

    async def _settled(self, user: str, entries: list[_Entry]) -> None:
        by_server: dict[str, set[tuple[str, str]]] = {}
        for e in entries:
            by_server.setdefault(e.server, set()).add((user, e.item))
        for server, keys in by_server.items():
            link = self._links.get(server)
            if link is not None:
                await link.pusher.settled(keys)

    def _give_up(self, held: _Unapplied, *, cancelled: bool) -> None:
        """Unregister entries left unapplied (the apply failed or was cancelled) and ask for
        a catch-up of their servers, which finds whatever they carried."""
        if not held.groups:
            return
        servers: set[tuple[str, str]] = set()
        count = 0
        for item, group in held.groups.items():
            if self._held.get((held.user, item)) is held:
                del self._held[(held.user, item)]
            servers.update((e.server, e.remote_user) for e in group)
            count += len(group)
        held.groups.clear()
        # Stopping (cancelled) is no news; a failure is.
        logger.log(
            logging.INFO if cancelled else logging.WARNING,
            "[%s] %d changes of user %s were received but not applied; catching up to find them",
            ", ".join(sorted({s for s, _ in servers})),
            count,
            held.user,
        )
        if self._request_catch_up is not None:
            for server, _ in sorted(servers):
                self._request_catch_up(server, held.user)

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
        for remote_item, state in (await link.client.user_data_of(remote_user_id, items)).items():
            key = items.get(remote_item)
            if key is not None:
                states[key] = state
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


def _first_groups(groups: dict[str, list[_Entry]], size: int) -> list[str]:
    """The first items of ``groups`` holding together at least ``size`` entries (or all)."""
    items: list[str] = []
    count = 0
    for item, group in groups.items():
        items.append(item)
        count += len(group)
        if count >= size:
            break
    return items


def _shares_records(version: str | None) -> bool:
    """Tell whether a Jellyfin version keeps one user-data record for items with the same
    provider ids (10.8 to 10.10; from 10.11 records are per item)."""
    parsed = parse_version(version) if version is not None else None
    return parsed is not None and parsed[:2] < (10, 11)
