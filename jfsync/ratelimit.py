"""A limiter for warnings that can repeat without end: the first few in full, then a count.

A misbehaving server can send garbage frames, or events for users jfsync does not sync, many
times a second; one log line each would bury everything else (and fill a disk). A
:class:`RepeatLimiter` logs the first ``burst`` occurrences of one kind of warning in full,
then counts the rest and writes one summary line per ``period_s`` (a minute by default) with
the count and the latest occurrence, for as long as they keep coming. Once a whole period
passes without any, the next one is logged in full again. Time comes from the injected
:class:`~jfsync.timing.Clock`; no timer runs: the summary of a period is written by the first
occurrence after it, or by :meth:`RepeatLimiter.flush` (call it when the source goes away).
"""

from __future__ import annotations

import logging
from typing import Final

from jfsync.timing import Clock

#: Occurrences logged in full before counting starts.
DEFAULT_BURST: Final = 3
#: How often a summary line is written while occurrences keep coming.
DEFAULT_PERIOD_S: Final = 60.0


class RepeatLimiter:
    """Log one kind of repetitive message: ``burst`` in full, then a summary per period."""

    def __init__(
        self,
        logger: logging.Logger,
        clock: Clock,
        what: str,
        *,
        burst: int = DEFAULT_BURST,
        period_s: float = DEFAULT_PERIOD_S,
        level: int = logging.WARNING,
    ) -> None:
        self._logger = logger
        self._clock = clock
        #: What is counted, for the summary line, e.g. ``"[a/alice] malformed frames"``.
        self.what = what
        self._burst = burst
        self._period_s = period_s
        self._level = level
        self._window_start: float | None = None
        self._shown = 0
        self._suppressed = 0
        self._latest = ""
        #: Every occurrence seen, logged or counted.
        self.total = 0

    @property
    def suppressed(self) -> int:
        """Occurrences counted but not yet reported by a summary line."""
        return self._suppressed

    def log(self, message: str, *args: object) -> None:
        """Record one occurrence; log it in full, or count it for the next summary."""
        self.total += 1
        now = self._clock.monotonic()
        if self._window_start is None or now - self._window_start >= self._period_s:
            quiet = self._suppressed == 0
            self._summarise(now)
            self._window_start = now
            if quiet:
                self._shown = 0  # a whole period without one: the flood is over
        if self._shown < self._burst:
            self._shown += 1
            self._logger.log(self._level, message, *args)
            if self._shown == self._burst:
                self._logger.log(
                    self._level,
                    "%s: more are counted, with one summary line per %.0f s",
                    self.what,
                    self._period_s,
                )
            return
        self._suppressed += 1
        self._latest = message % args if args else message

    def flush(self) -> None:
        """Write the summary of what is counted and not yet reported, if anything."""
        self._summarise(self._clock.monotonic())

    def _summarise(self, now: float) -> None:
        if not self._suppressed:
            return
        start = self._window_start if self._window_start is not None else now
        self._logger.log(
            self._level,
            "%s: %d more in the last %.0f s (latest: %s)",
            self.what,
            self._suppressed,
            max(0.0, now - start),
            self._latest,
        )
        self._suppressed = 0
        self._latest = ""
