"""Logging setup and the two habits every jfsync log line follows.

* :class:`SecretScrubber` is a logging filter that replaces every known secret (API keys,
  tokens, passwords, the status token) with ``***`` in the final message, as a second line of
  defence behind code that never logs secrets in the first place.
* :class:`FailureStreak` logs the first failure of a streak at WARNING (an unexpected one at
  ERROR with its traceback), repeats at DEBUG, and the recovery at INFO with the length of the
  outage, so a peer that is down for a day writes two lines at the default level, not
  thousands.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from jfsync.timing import Clock

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: Libraries whose DEBUG lines carry request headers or SQL parameters (tokens): capped at INFO
#: even when jfsync logs at DEBUG.
CHATTY_LIBRARIES = ("websockets", "aiosqlite", "aiohttp.access")


class SecretScrubber(logging.Filter):
    """Replace known secret strings in log records with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Add more secrets to scrub (tokens minted at run time, for example)."""
        self._secrets.update(s for s in secrets if s and len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the message, scrub it, and keep the record."""
        if not self._secrets:
            return True
        message = record.getMessage()
        scrubbed = message
        for secret in self._secrets:
            if secret in scrubbed:
                scrubbed = scrubbed.replace(secret, "***")
        if record.exc_info and record.exc_text is None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            for secret in self._secrets:
                record.exc_text = record.exc_text.replace(secret, "***")
        if scrubbed != message or record.args:
            record.msg = scrubbed
            record.args = None
        return True


#: The process-wide scrubber installed by :func:`configure_logging`.
SCRUBBER = SecretScrubber()


def configure_logging(level: str = "info", secrets: Iterable[str] = ()) -> None:
    """Log to stderr at ``level`` with secrets scrubbed from every line."""
    SCRUBBER.add(secrets)
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    for handler in root.handlers:
        if getattr(handler, "_jfsync", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(SCRUBBER)
    handler._jfsync = True  # type: ignore[attr-defined]
    root.addHandler(handler)


class FailureStreak:
    """Log a streak of failures once at WARNING and its end once at INFO."""

    def __init__(self, logger: logging.Logger, subject: str, clock: Clock) -> None:
        self._logger = logger
        self._subject = subject
        self._clock = clock
        self._since: float | None = None
        self.count = 0

    @property
    def failing(self) -> bool:
        """Tell whether a streak is under way."""
        return self._since is not None

    def failed(self, what: str, error: BaseException | str, *, unexpected: bool = False) -> None:
        """Record one failure; the first of a streak is a WARNING, the rest DEBUG.

        ``unexpected`` (a bug, not a known failure): the first line is an ERROR carrying the
        traceback of ``error``; repeats are still DEBUG.
        """
        first = self._since is None
        if first:
            self._since = self._clock.monotonic()
        self.count += 1
        level = logging.DEBUG
        if first:
            level = logging.ERROR if unexpected else logging.WARNING
        exc_info = error if first and unexpected and isinstance(error, BaseException) else None
        self._logger.log(level, "[%s] %s: %s", self._subject, what, error, exc_info=exc_info)

    def succeeded(self, what: str) -> None:
        """End a streak, if any, with one INFO line saying how long it lasted."""
        if self._since is None:
            return
        lasted = self._clock.monotonic() - self._since
        self._logger.info(
            "[%s] %s again after %.1f s and %d failures", self._subject, what, lasted, self.count
        )
        self._since = None
        self.count = 0
