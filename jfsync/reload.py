"""Config edits without a restart: what changed between two configs, and the file watcher.

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

:class:`ConfigReloader` watches the file: every ``poll_s`` (on the injected clock) it compares the
file's size, modification time and SHA-256 with the last seen, and on a change, or on SIGHUP
(:meth:`ConfigReloader.request`), it loads and validates the file and hands it to the service. An
invalid file leaves the running config as it is; why (one line per problem, secret-free) is
logged and shown as ``config.last_error`` on ``/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jfsync.config import Config, ServerConfig, load_config
from jfsync.errors import ConfigError
from jfsync.logs import configure_logging
from jfsync.timing import Clock

if TYPE_CHECKING:
    from jfsync.service import SyncService

logger = logging.getLogger(__name__)

#: How often the config file is looked at (seconds).
POLL_S = 2.0

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


def _fingerprint(path: Path) -> tuple[int, int, str] | None:
    """(size, mtime ns, SHA-256) of the file, or None when it cannot be read."""
    try:
        stat = os.stat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, digest


class ConfigReloader:
    """Watch the config file and apply valid edits to a running :class:`SyncService`."""

    def __init__(
        self,
        service: SyncService,
        path: str | Path,
        *,
        clock: Clock | None = None,
        poll_s: float = POLL_S,
        load: Callable[[Path], Config] = load_config,
    ) -> None:
        self.service = service
        self.path = Path(path)
        self.clock = clock or service.clock
        self.poll_s = poll_s
        self._load = load
        self._asked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The reload under way: a stop waits for it rather than cut it in half.
        self._current: asyncio.Future[bool] | None = None
        self._seen = _fingerprint(self.path)
        #: Reloads done (valid or not), for tests and status.
        self.attempts = 0
        self._done = asyncio.Condition()
        service.config_status = {
            "path": str(self.path),
            "loaded_at_ms": self.clock.wall_ms(),
            "last_error": None,
            "last_changes": [],
            "pending_restart": [],
        }

    @property
    def status(self) -> dict[str, Any]:
        """``{path, loaded_at_ms, last_error, last_changes, pending_restart}``."""
        assert self.service.config_status is not None
        return self.service.config_status

    def start(self) -> None:
        """Start watching the file (and answering :meth:`request`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="jfsync-config-watch")

    async def stop(self) -> None:
        """Stop watching; a reload under way is finished first (never left half applied)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        current, self._current = self._current, None
        if current is not None and not current.done():
            with contextlib.suppress(Exception):
                await current

    def request(self) -> None:
        """Reload soon whatever the file looks like (SIGHUP)."""
        self._asked.set()

    async def wait_attempts(self, count: int, timeout_s: float = 30.0) -> None:
        """Wait until at least ``count`` reloads were attempted (tests)."""
        async with asyncio.timeout(timeout_s), self._done:
            await self._done.wait_for(lambda: self.attempts >= count)

    async def _watch(self) -> None:
        while True:
            sleeper = asyncio.ensure_future(self.clock.sleep(self.poll_s))
            asked = asyncio.ensure_future(self._asked.wait())
            try:
                await asyncio.wait({sleeper, asked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (sleeper, asked):
                    fut.cancel()
                await asyncio.gather(sleeper, asked, return_exceptions=True)
            signalled = self._asked.is_set()
            self._asked.clear()
            seen = await asyncio.to_thread(_fingerprint, self.path)
            if not signalled and seen == self._seen:
                continue
            self._seen = seen
            self._current = asyncio.ensure_future(
                self.reload("SIGHUP" if signalled else "the file changed")
            )
            try:
                await asyncio.shield(self._current)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("config reload failed unexpectedly; the running config stays")

    async def reload(self, reason: str = "asked") -> bool:
        """Load, validate and apply the file now; return whether it was applied."""
        status = self.status
        try:
            try:
                new = await asyncio.to_thread(self._load, self.path)
            except ConfigError as err:
                status["last_error"] = "; ".join(err.problems)
                logger.error(
                    "config reload (%s): %s is not valid; the running config stays: %s",
                    reason,
                    self.path,
                    status["last_error"],
                )
                return False
            configure_logging(new.logging.level, new.secret_values())  # new secrets scrubbed
            try:
                lines = await self.service.reconfigure(new)
            except Exception as err:
                status["last_error"] = f"applying the new config failed: {err}"
                logger.exception("config reload (%s): applying it failed", reason)
                return False
            status["last_error"] = None
            status["loaded_at_ms"] = self.clock.wall_ms()
            status["last_changes"] = list(lines)
            logger.info(
                "config reloaded (%s): %s", reason, "; ".join(lines) if lines else "no change"
            )
            return True
        finally:
            self.attempts += 1
            async with self._done:
                self._done.notify_all()
