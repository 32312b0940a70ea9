"""Prometheus metrics for ``GET /metrics``: a private registry filled from the status snapshot.

:class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` (never the global
one, so several services in one process, as in tests, do not collide). Everything but the
latency histogram is collected at scrape time from the same secret-free snapshot ``/status``
serves (:func:`jfsync.ops.snapshot.build_status`), so the two views never disagree. The
propagation latency histogram is fed by the pushers' write hook through
:meth:`Metrics.observe_write`. The series are listed in ``docs/status.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from jfsync.sync.subscriber import SubscriberState

#: The content type Prometheus expects for the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Propagation latency buckets (seconds): live changes take well under a second, a change
#: queued during a peer's outage waits until it returns (minutes to hours).
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
#: Write outcomes per peer, in the order they are exported.
WRITE_OUTCOMES = ("done", "skipped", "failed", "dead")
#: What the reset guard did when it fired (jfsync.sync.resetguard), in the order they are exported.
RESET_ACTIONS = ("restored", "held")
_OUTBOX_KEY_OF_OUTCOME = {
    "done": "writes_done",
    "skipped": "writes_skipped",
    "failed": "failures",
    "dead": "dead_parked",
}


# ``*_created`` series (a timestamp per histogram) only add noise for an application that
# exports nothing else through prometheus-client; jfsync owns its process.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The jfsync metrics: a private registry, the latency histogram and the snapshot."""

    def __init__(self, peers: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._latency = Histogram(
            "jfsync_propagation_latency_seconds",
            "Time from a change being queued for a peer to its successful write there.",
            ["peer"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        # Export every peer's histogram from the start, not after its first write; the
        # children are kept (looking one up takes a lock and a label check per write).
        self._latency_of = {peer: self._latency.labels(peer=peer) for peer in peers}
        self._snapshot = _SnapshotCollector()
        self.registry.register(self._snapshot)

    def observe_write(self, peer: str, latency_s: float) -> None:
        """Record one successful write to ``peer`` and its propagation latency."""
        child = self._latency_of.get(peer)
        if child is None:
            child = self._latency_of[peer] = self._latency.labels(peer=peer)
        child.observe(latency_s)

    def render(self, snapshot: Mapping[str, Any]) -> bytes:
        """Return the Prometheus text for ``snapshot`` (a :func:`build_status` result)."""
        self._snapshot.snapshot = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self._snapshot.snapshot = None


class _SnapshotCollector(Collector):
    """Turn one status snapshot into metric families at scrape time."""

    def __init__(self) -> None:
        self.snapshot: Mapping[str, Any] | None = None

    def describe(self) -> Iterable[Metric]:
        # Names depend on the snapshot; describing nothing keeps registration cheap.
        return []

    def collect(self) -> Iterable[Metric]:
        snapshot = self.snapshot
        if snapshot is None:
            return []
        return list(_families(snapshot))


def _families(snap: Mapping[str, Any]) -> Iterator[Metric]:
    info = GaugeMetricFamily("jfsync_info", "jfsync version (always 1).", labels=["version"])
    info.add_metric([str(snap["version"])], 1)
    yield info
    yield GaugeMetricFamily(
        "jfsync_uptime_seconds", "Seconds since the service started.", value=snap["uptime_s"]
    )
    counters: Mapping[str, int] = snap["counters"]
    for key, help_text in (
        ("events_received", "UserDataChanged messages received from all servers."),
        ("entries_received", "Item entries in those messages (parent folders excluded)."),
        ("echoes", "Entries recognised as echoes of jfsync's own writes and ignored."),
        ("changes_applied", "Observations (events and scans) that changed the ledger."),
        ("scans", "Catch-up scans run after a socket (re)connected."),
        ("scan_changes", "Changes found by catch-up scans."),
        ("read_backs", "Items read back after an event jfsync could not attribute by content."),
    ):
        yield CounterMetricFamily(f"jfsync_{key}", help_text, value=counters[key])

    reachable = GaugeMetricFamily(
        "jfsync_server_reachable", "1 when the server answered jfsync.", labels=["server"]
    )
    sockets = GaugeMetricFamily(
        "jfsync_socket_state",
        "1 for the state each user's websocket is in, 0 for the other states.",
        labels=["server", "user", "state"],
    )
    reconnects = CounterMetricFamily(
        "jfsync_socket_reconnects",
        "Reconnects of each user's websocket.",
        labels=["server", "user"],
    )
    writes = CounterMetricFamily(
        "jfsync_writes", "Writes to each peer by outcome.", labels=["peer", "outcome"]
    )
    depth = GaugeMetricFamily(
        "jfsync_outbox_depth", "Writes queued for each peer (dead rows excluded).", labels=["peer"]
    )
    oldest = GaugeMetricFamily(
        "jfsync_outbox_oldest_age_seconds",
        "Age of the oldest queued write for each peer (0 when none).",
        labels=["peer"],
    )
    in_flight = GaugeMetricFamily(
        "jfsync_outbox_in_flight", "Writes to each peer under way now.", labels=["peer"]
    )
    dead = GaugeMetricFamily(
        "jfsync_outbox_dead_rows", "Writes parked as dead for each peer.", labels=["peer"]
    )
    paused = GaugeMetricFamily(
        "jfsync_peer_paused", "1 when the peer refused jfsync's API key.", labels=["peer"]
    )
    down = GaugeMetricFamily(
        "jfsync_peer_down", "1 while the peer is unreachable for writes.", labels=["peer"]
    )
    states = [str(state) for state in SubscriberState]
    for server in snap["servers"]:
        name = str(server["name"])
        reachable.add_metric([name], 1 if server["reachable"] else 0)
        for user in server["users"]:
            for state in states:
                sockets.add_metric([name, str(user["user"]), state], int(user["state"] == state))
            reconnects.add_metric([name, str(user["user"])], user["reconnects"])
        outbox = server["outbox"]
        for outcome in WRITE_OUTCOMES:
            writes.add_metric([name, outcome], outbox[_OUTBOX_KEY_OF_OUTCOME[outcome]])
        depth.add_metric([name], outbox["depth"])
        oldest.add_metric([name], outbox["oldest_age_s"] or 0.0)
        in_flight.add_metric([name], outbox["in_flight"])
        dead.add_metric([name], outbox.get("dead_count", len(outbox["dead"])))
        paused.add_metric([name], 0 if outbox["pause_reason"] is None else 1)
        down.add_metric([name], 0 if outbox["down_since_ms"] is None else 1)
    yield from (reachable, sockets, reconnects, writes, depth, oldest, in_flight, dead)
    yield from (paused, down)

    yield from _reset_guard_families(snap)

    identity = GaugeMetricFamily(
        "jfsync_identity_items",
        "Items per server pair by match result (exported once the identity strategy counts).",
        labels=["pair", "result"],
    )
    for pair in snap["identity"]["pairs"]:
        label = "+".join(str(s) for s in pair["servers"])
        for result in ("matched", "unmatched", "ambiguous"):
            if pair[result] is not None:
                identity.add_metric([label, result], pair[result])
    yield identity
    yield GaugeMetricFamily(
        "jfsync_ledger_size_bytes",
        "Size of the SQLite ledger and its write-ahead log.",
        value=snap["ledger"]["size_bytes"],
    )
    yield GaugeMetricFamily(
        "jfsync_library_index_size_bytes",
        "Size of the library index file beside the ledger and its write-ahead log.",
        value=snap["ledger"]["index_size_bytes"],
    )
    last_reconcile = snap["reconcile"]["last_at_ms"]
    if last_reconcile is not None:
        yield GaugeMetricFamily(
            "jfsync_last_reconcile_timestamp_seconds",
            "Unix time the last full reconcile finished.",
            value=last_reconcile / 1000,
        )


def _reset_guard_families(snap: Mapping[str, Any]) -> Iterator[Metric]:
    """The reset guard's counter of triggers and gauge of holds (jfsync.sync.resetguard)."""
    guard = snap.get("reset_guard") or {}
    triggers = CounterMetricFamily(
        "jfsync_reset_guard_triggers",
        "Times a server showed a user's data wiped (restored or held instead of propagated).",
        labels=["server", "action"],
    )
    # Every server and action from the start (0), so an alert on its increase needs no absent().
    counts: dict[tuple[str, str], int] = {
        (str(s["name"]), action): 0 for s in snap["servers"] for action in RESET_ACTIONS
    }
    for entry in guard.get("trigger_counts", []):
        counts[(str(entry["server"]), str(entry["action"]))] = entry["count"]
    for (server, action), count in counts.items():
        triggers.add_metric([server, action], count)
    holds = GaugeMetricFamily(
        "jfsync_reset_holds",
        "Users held by the reset guard on each server (waiting for jfsync accept-reset).",
        labels=["server"],
    )
    held: dict[str, int] = {str(s["name"]): 0 for s in snap["servers"]}
    for hold in guard.get("holds", []):
        held[str(hold["server"])] = held.get(str(hold["server"]), 0) + 1
    for server, count in held.items():
        holds.add_metric([server], count)
    yield triggers
    yield holds
