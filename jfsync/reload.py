"""Config edits without a restart: what changed between two configs, and what each needs.

:func:`diff_configs` compares the running config with a new one (pure) and says what each change
needs: people, maps and choices are matched again (sockets of accounts no longer synced are
closed, new ones opened); fields, modes and users' register choices change the merge policy
(rows queued that it no longer allows are dropped, with a log line); a library filter rescans
that server's libraries; intervals take effect on the next wait; playback-session settings
restart each server's session watcher, and a changed ``alerts`` section its notifier. A server
added, removed or reached differently (URL, key, TLS, timeouts, path rewrites, credentials) or
a different reset guard rule re-creates the replicator inside the process: the ledger is closed
and opened again, so nothing queued is lost, and every socket reconnects and catches up. The
ledger path and the status endpoint are only read at start; a change to them is reported and
waits for a restart.
The file watcher that feeds it is :class:`jfsync.ops.reloader.ConfigReloader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jfsync.config import Config, ServerConfig

#: Server settings that change how the server is reached (the link is made again).
_CONNECTION_KEYS = (
    "url",
    "api_key",
    "verify_tls",
    "timeout_s",
    "max_message_size",
    "users",
    "path_rewrites",
)


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What differs between the running config and a new one, and what each part needs."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: Servers reached differently (URL, key, TLS, timeouts, rewrites, credentials).
    reconnect: tuple[str, ...] = ()
    #: Servers whose library filter changed.
    filters: tuple[str, ...] = ()
    #: Servers whose mode changed.
    modes: tuple[str, ...] = ()
    users: bool = False
    policy: bool = False
    reset_guard: bool = False
    intervals: bool = False
    #: How playback sessions are followed changed (``sync.follow_sessions`` and its periods).
    sessions: bool = False
    #: The ``alerts`` section changed.
    alerts: bool = False
    logging: bool = False
    #: The servers' order changed (it breaks ties between servers).
    server_order: bool = False
    #: Settings read only at start (changed, kept as they are until a restart).
    needs_restart: tuple[str, ...] = ()
    lines: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        """Nothing changed (or only what waits for a restart)."""
        return not self.lines

    @property
    def rebuild(self) -> bool:
        """The replicator must be made again (servers or how they are reached changed)."""
        return bool(
            self.added or self.removed or self.reconnect or self.reset_guard or self.server_order
        )


def _server_part(server: ServerConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(server, k) for k in keys}


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Compare two validated configs (pure); see the module docstring for what each needs."""
    lines: list[str] = []
    old_s = {s.name: s for s in old.servers}
    new_s = {s.name: s for s in new.servers}
    added = tuple(n for n in new_s if n not in old_s)
    removed = tuple(n for n in old_s if n not in new_s)
    common = [n for n in new_s if n in old_s]
    reconnect = tuple(
        n
        for n in common
        if _server_part(old_s[n], _CONNECTION_KEYS) != _server_part(new_s[n], _CONNECTION_KEYS)
    )
    filters = tuple(n for n in common if old_s[n].libraries != new_s[n].libraries)
    modes = tuple(n for n in common if old_s[n].mode != new_s[n].mode)
    order = [n for n in (s.name for s in old.servers) if n in new_s] != [
        n for n in (s.name for s in new.servers) if n in old_s
    ]
    for name in added:
        lines.append(f"server {name} added")
    for name in removed:
        lines.append(f"server {name} removed")
    for name in reconnect:
        what = [k for k in _CONNECTION_KEYS if getattr(old_s[name], k) != getattr(new_s[name], k)]
        lines.append(f"server {name}: {', '.join(what)} changed (reconnecting)")
    for name in filters:
        lines.append(f"server {name}: library filter changed")
    for name in modes:
        lines.append(f"server {name}: mode {old_s[name].mode} -> {new_s[name].mode}")
    if order:
        lines.append("server order changed (ties between servers)")
    users = old.users != new.users
    if users:
        lines.append("users (match, map, exclude or choices) changed")
    o, n = old.sync, new.sync
    policy_keys = ("fields", "initial_merge", "seed_server", "rewatch_protection")
    policy = any(getattr(o, k) != getattr(n, k) for k in policy_keys)
    if policy:
        lines.append(
            "sync.fields/initial_merge/seed_server/rewatch_protection changed "
            f"(fields: {_fields(n)})"
        )
    guard_keys = ("reset_guard", "reset_guard_min_items", "reset_guard_fraction")
    reset_guard = any(getattr(o, k) != getattr(n, k) for k in guard_keys)
    if reset_guard:
        lines.append("sync.reset_guard settings changed")
    interval_keys = ("reconcile_interval", "user_refresh_interval", "shutdown_grace")
    intervals = any(getattr(o, k) != getattr(n, k) for k in interval_keys)
    if intervals:
        lines.append("sync intervals changed")
    session_keys = ("follow_sessions", "session_quiet", "live_progress")
    sessions = any(getattr(o, k) != getattr(n, k) for k in session_keys)
    if sessions:
        lines.append("playback sessions settings changed (follow_sessions, periods)")
    alerts = old.alerts != new.alerts
    if alerts:
        lines.append("alerts changed")
    logging_changed = old.logging != new.logging
    if logging_changed:
        lines.append(f"logging.level -> {new.logging.level}")
    needs_restart: list[str] = []
    if old.ledger != new.ledger:
        needs_restart.append("ledger")
    if old.status != new.status:
        needs_restart.append("status")
    return ConfigDiff(
        added=added,
        removed=removed,
        reconnect=reconnect,
        filters=filters,
        modes=modes,
        users=users,
        policy=policy or bool(modes),
        reset_guard=reset_guard,
        intervals=intervals,
        sessions=sessions,
        alerts=alerts,
        logging=logging_changed,
        needs_restart=tuple(needs_restart),
        lines=tuple(lines),
        server_order=order,
    )


def _fields(sync: Any) -> str:
    return ", ".join(str(f) for f in sync.fields)


def restart_note(keys: tuple[str, ...]) -> str:
    """The line saying which changed settings wait for a restart."""
    return (
        f"{' and '.join(keys)} changed in the file; kept as they are until jfsync restarts "
        "(they are only read at start)"
    )
