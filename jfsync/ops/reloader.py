"""Watching the config file of a running jfsync, and applying what changed.

:class:`ConfigReloader` watches the file: every ``poll_s`` (on the injected clock) it compares
the file's size, modification time and SHA-256 with the last seen, and on a change, or on SIGHUP
(:meth:`ConfigReloader.request`), it loads and validates the file and hands it to the service.
An invalid file leaves the running config as it is; why (one line per problem, secret-free) is
logged and shown as ``config.last_error`` on ``/status``. What a change means for the running
service is decided by :func:`jfsync.reload.diff_configs` and applied by
:meth:`jfsync.service.SyncService.reconfigure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jfsync.config import Config, load_config
from jfsync.errors import ConfigError
from jfsync.logs import configure_logging
from jfsync.service import SyncService
from jfsync.timing import Clock

logger = logging.getLogger(__name__)

#: How often the config file is looked at (seconds).
POLL_S = 2.0


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
