"""The status snapshot: what ``/status``, ``/metrics``, the page and the alerts are built from.

:func:`build_status` turns what a running service exposes (its :class:`StatusSource`: config,
clock, ledger, per-server links, identity, reconciler, reset guard, counters and activity feed)
into one secret-free JSON-ready dict (shape documented in ``docs/status.md``);
:func:`identity_status` and :func:`identity_details` are its item-matching parts. The
protocols below are the only view of the service this module and the status server have, so
neither imports :mod:`jfsync.service` (which imports them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Set
from typing import TYPE_CHECKING, Any, Protocol

from jfsync import __version__
from jfsync.ops.activity import SHOWN_IN_STATUS, ActivityFeed
from jfsync.ops.alerts import Alerter
from jfsync.sync.identity import IndexedIdentity
from jfsync.sync.index import index_path

if TYPE_CHECKING:
    from jfsync.config import Config, ServerConfig
    from jfsync.sync.delivery import Pusher, WriteHook
    from jfsync.sync.identity import ItemIdentity
    from jfsync.sync.ledger import Ledger
    from jfsync.sync.reconcile import Reconciler
    from jfsync.sync.resetguard import ResetGuard
    from jfsync.sync.sessions import SessionWatcher
    from jfsync.sync.subscriber import Subscriber
    from jfsync.timing import Clock

#: Dead rows listed per peer in the status (the oldest; ``dead_count`` has them all).
DEAD_ROWS_IN_STATUS = 50


class LinkView(Protocol):
    """What the snapshot reads of one configured server (``jfsync.service.ServerLink``)."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> ServerConfig: ...
    @property
    def pusher(self) -> Pusher: ...
    @property
    def reachable(self) -> bool: ...
    @property
    def version(self) -> str | None: ...
    @property
    def server_id(self) -> str | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def users_refreshed_ms(self) -> int | None: ...
    @property
    def subscribers(self) -> Mapping[str, Subscriber]: ...
    @property
    def sessions(self) -> SessionWatcher | None: ...


class CountersView(Protocol):
    """The service's running totals (``jfsync.service.Counters``)."""

    @property
    def events_received(self) -> int: ...
    @property
    def entries_received(self) -> int: ...
    @property
    def echoes(self) -> int: ...
    @property
    def changes_applied(self) -> int: ...
    @property
    def scans(self) -> int: ...
    @property
    def scan_changes(self) -> int: ...
    @property
    def read_backs(self) -> int: ...


class StatusSource(Protocol):
    """What the status server, the snapshot and the alerts need of a running service."""

    @property
    def config(self) -> Config: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def links(self) -> Mapping[str, LinkView]: ...
    @property
    def identity(self) -> ItemIdentity: ...
    @property
    def reconciler(self) -> Reconciler | None: ...
    @property
    def reset_guard(self) -> ResetGuard: ...
    @property
    def counters(self) -> CountersView: ...
    @property
    def activity(self) -> ActivityFeed: ...
    @property
    def alerter(self) -> Alerter: ...
    @property
    def started_ms(self) -> int | None: ...
    @property
    def last_reconcile_ms(self) -> int | None: ...
    @property
    def last_reconcile_result(self) -> str | None: ...
    @property
    def config_status(self) -> dict[str, Any] | None: ...
    @property
    def write_observers(self) -> list[WriteHook]: ...

    async def accept_reset(
        self, server: str, user: str | None, *, restore: bool = False
    ) -> dict[str, Any]:
        """Resolve reset holds of ``server`` (one user, or all): accept, or ``restore``."""
        ...


def identity_status(source: StatusSource) -> dict[str, Any]:
    """Item matching counts per server pair: ``{"pairs": [{"servers": [a, b], "matched",
    "unmatched", "ambiguous"}]}`` (counts are None with the identical-ids strategy).

    :func:`identity_details` has the samples and per-server figures behind them.
    """
    details = identity_details(source)
    keys = ("servers", "matched", "unmatched", "ambiguous")
    return {"pairs": [{k: pair.get(k) for k in keys} for pair in details["pairs"]]}


def identity_details(source: StatusSource) -> dict[str, Any]:
    """Everything about item matching and reconciles, for status pages and reports.

    ``pairs``: per server pair ``servers``, ``matched``, ``unmatched``, ``ambiguous``,
    ``unmatched_by_server`` ({server: n}), ``matched_by_rule`` ({id, path,
    provider: n}) and ``samples`` ({matched: [{a: label, b: label, rule}], unmatched:
    [item], ambiguous: [item + rule]}, items as ``{server, id, type, name, path,
    provider_ids}``); ``servers``: {server: {items, scanned_at_ms}}; ``matched_at_ms``;
    ``strategy``; ``reconcile``: {interval_s, library_refreshes, last: {started_ms,
    finished_ms, changes, errors, summary} | None}.
    """
    status = dict(source.identity.status())
    if not status.get("pairs"):
        names = list(source.links) or [s.name for s in source.config.servers]
        status["pairs"] = [
            {"servers": [a, b], "matched": None, "unmatched": None, "ambiguous": None}
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        ]
    if source.reconciler is not None:
        status["reconcile"] = source.reconciler.status()
    return status


async def item_names(source: StatusSource, server: str, items: Iterable[str]) -> dict[str, str]:
    """Canonical item -> a readable name (``Title (1999) [Movie]``) from the library index.

    Local reads of the index only, never of a server; empty with the identical-ids strategy
    (no index) and when the lookup fails (the index closing): names are a nicety.
    """
    identity = source.identity
    wanted = list(items)
    if not isinstance(identity, IndexedIdentity) or not wanted:
        return {}
    try:
        remote = await identity.index.remote_of(server, wanted)
        found = await identity.index.find(server, remote.values())
    except Exception:  # noqa: BLE001 - a name is not worth failing the status for
        return {}
    return {key: found[rid].label() for key, rid in remote.items() if rid in found}


async def activity_status(
    source: StatusSource,
    limit: int = SHOWN_IN_STATUS,
    dead: Set[tuple[str, str, str]] = frozenset(),
) -> list[Any]:
    """The newest ``limit`` activity entries, item names looked up once in the library index.

    A delivery still queued whose row is among ``dead`` ((peer, user, item) of dead rows) is
    shown as ``dead``.
    """
    feed = source.activity
    for server, items in feed.unnamed(limit).items():
        names = await item_names(source, server, items)
        if names:
            feed.set_names(server, names)
    shown = [entry.as_dict(feed.user_names) for entry in feed.entries(limit)]
    if dead:
        for entry in shown:
            for target in entry["to"]:
                if (
                    target["state"] == "queued"
                    and (target["server"], entry["user"], entry["item"]) in dead
                ):
                    target["state"] = "dead"
    return shown


def sessions_status(watcher: SessionWatcher | None) -> dict[str, Any] | None:
    """The session watcher's part of a server's status (None when sessions are not followed)."""
    if watcher is None:
        return None
    status = watcher.status
    return {
        "mode": status.mode,
        "state": str(status.state),
        "playing": status.playing,
        "reads": status.reads,
        "last_error": status.last_error,
    }


async def build_status(source: StatusSource) -> dict[str, Any]:
    """A secret-free snapshot of servers, sockets and peers (the status endpoint's body)."""
    now_ms = source.clock.wall_ms()
    ledger = source.ledger
    servers = []
    dead_keys: set[tuple[str, str, str]] = set()
    # Every peer's outbox in ONE read of the ledger (counted in SQL; only a sample of the dead
    # rows is loaded: a peer can park thousands): polled every few seconds, it must not queue
    # a row of reads in front of the live events' transactions.
    outboxes = await ledger.outbox_summaries(list(source.links), DEAD_ROWS_IN_STATUS)
    for link in source.links.values():
        stats = link.pusher.stats
        box = outboxes[link.name]
        dead_count, dead = box.dead_count, box.dead
        oldest = box.oldest_age_s(now_ms)
        dead_names = await item_names(source, link.name, {r.item for r in dead})
        dead_keys.update((link.name, r.user, r.item) for r in dead)
        servers.append(
            {
                "name": link.name,
                "url": link.config.url,
                # Answered at bring-up and not found down by its pusher since.
                "reachable": link.reachable and stats.down_since_ms is None,
                "version": link.version,
                "server_id": link.server_id,
                "last_error": link.last_error,
                "users_refreshed_ms": link.users_refreshed_ms,
                "sessions": sessions_status(link.sessions),
                "users": [
                    {
                        "user": sub.user_name,
                        "state": str(sub.status.state),
                        "connected_since_ms": sub.status.connected_since_ms,
                        "last_event_age_s": (
                            None
                            if sub.status.last_event_at_ms is None
                            else (now_ms - sub.status.last_event_at_ms) / 1000
                        ),
                        "reconnects": sub.status.reconnect_count,
                        "last_error": sub.status.last_error,
                        "pause_reason": sub.status.pause_reason,
                        "event_failures": sub.status.event_failures,
                        "last_event_error": sub.status.last_event_error,
                    }
                    for sub in link.subscribers.values()
                ],
                "outbox": {
                    "depth": box.depth,
                    "oldest_age_s": oldest,
                    "in_flight": link.pusher.in_flight,
                    "writes_done": stats.writes_done,
                    "writes_skipped": stats.writes_skipped,
                    "failures": stats.failures,
                    "dead_parked": stats.dead_parked,
                    "down_since_ms": stats.down_since_ms,
                    "pause_reason": stats.pause_reason,
                    "last_error": stats.last_error,
                    "dead_count": dead_count,
                    "dead": [
                        {
                            "user": r.user,
                            "item": r.item,
                            "name": dead_names.get(r.item),
                            "reason": r.last_error,
                        }
                        for r in dead
                    ],
                },
            }
        )
    counters = source.counters
    return {
        "version": __version__,
        "now_ms": now_ms,
        "uptime_s": (now_ms - (source.started_ms or now_ms)) / 1000,
        "servers": servers,
        "identity": identity_status(source),
        "ledger": {
            "path": str(source.config.ledger),
            "size_bytes": _file_size(str(source.config.ledger)),
            "index_path": index_path(source.config.ledger),
            "index_size_bytes": _file_size(index_path(source.config.ledger)),
        },
        "reset_guard": await source.reset_guard.status(),
        "reconcile": {
            "last_at_ms": source.last_reconcile_ms,
            "last_result": source.last_reconcile_result,
        },
        # The config file and its last reload: {path, loaded_at_ms, last_error, last_changes,
        # pending_restart}; None when not run from a file.
        "config": source.config_status,
        "counters": {
            "events_received": counters.events_received,
            "entries_received": counters.entries_received,
            "echoes": counters.echoes,
            "changes_applied": counters.changes_applied,
            "scans": counters.scans,
            "scan_changes": counters.scan_changes,
            "read_backs": counters.read_backs,
        },
        "activity": await activity_status(source, dead=dead_keys),
        "alerts": source.alerter.status(),
    }


def _file_size(path: str) -> int:
    """Bytes of an SQLite file and its write-ahead log (0 when missing or in memory)."""
    total = 0
    for name in (path, path + "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(name).st_size
    return total
