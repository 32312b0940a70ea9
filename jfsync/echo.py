"""The echo rule: telling jfsync's own writes and stale events apart from user changes (pure).

Every user-data save on a Jellyfin server is pushed back to that user's sockets about 500 ms
later (a trailing debounce), with the state read at flush time and no origin. jfsync's own
writes therefore come back as events, and an event flushed *before* a write can still be on its
way when the write is done. The rule, per (server, user, item):

* when jfsync writes a state, it records that state as *pending*, with its write time and the
  state it replaced (:func:`record_write`), and the ledger sets it as the last-known state;
* an incoming event whose state equals a pending state is an echo: it consumes that pending
  state and every older one of the key, and is not a change (:func:`match_echo`). The OLDEST
  equal entry matches, so a repeated state never swallows the echo of a write in between;
  this covers a debounced echo that merged several writes (it equals the newest) and a stale
  echo that arrives after a newer write (it equals an older one and only consumes up to it,
  so the newer write's echo is still recognised);
* an incoming event whose state equals the state a pending write *replaced* was flushed before
  that write: it is stale, not a change, and consumes only the entries older than that write.
  Without this, such an event would undo the write on every server;
* any other state is a real change, diffed register by register against the last-known state,
  so an echo that also carries a user's change still shows that change;
* pending states older than :data:`ECHO_MAX_AGE_MS` are dropped, and at most
  :data:`ECHO_MAX_ENTRIES` are kept per key (the newest).

A state *read* from the server (a scan page) is matched the same way but consumes nothing (an
echo of an older write may still be on its way), and only against entries recorded at or after
the time the page was requested (``read_at_ms``): a page requested after a write completed
already shows that write, so it is fresh with respect to it.

Limitations (content is all there is; the next scan repairs both):

* a user who, within the age bound, sets exactly a pending or replaced state (for example
  undoes, on the target, a change jfsync just wrote there, inside one debounce window) is
  taken for an echo or a stale event;
* an event flushed before a state jfsync *read* (a scan page, the compare-before-write read)
  and delivered after it looks like a change back. Guarding reads like writes would instead
  swallow a user who goes back to the previous state inside one debounce window: the same
  harm, so reads are not guarded.

A socket reconnect makes every pending state moot (events of the old socket never arrive): the
caller then forgets them (the ledger's ``forget_echoes``).

Times are wall-clock milliseconds passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from jfsync.model import UserData

#: Echoes arrive ~0.5 s after the last write of a burst; a minute covers slow sockets and
#: server stalls, and a pending state that old is no longer worth matching.
ECHO_MAX_AGE_MS = 60_000

#: One write per outbox row at a time keeps this short; 8 covers rapid re-writes of one key.
ECHO_MAX_ENTRIES = 8


class Verdict(StrEnum):
    """What an incoming state is, for the echo rule."""

    ECHO = "echo"
    STALE = "stale"
    CHANGE = "change"


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A state jfsync wrote to one (server, user, item) whose echo has not been seen yet.

    ``replaced`` is what the server held just before the write, when known.
    """

    state: UserData
    written_ms: int
    replaced: UserData | None = None


@dataclass(frozen=True, slots=True)
class EchoMatch:
    """The verdict on an incoming state and the pending writes that remain after it."""

    verdict: Verdict
    pending: tuple[PendingWrite, ...]

    @property
    def is_echo(self) -> bool:
        """True when the state is not a change (an echo or a stale event)."""
        return self.verdict is not Verdict.CHANGE


def prune(pending: Sequence[PendingWrite], now_ms: int) -> tuple[PendingWrite, ...]:
    """Drop pending writes older than the age bound and keep only the newest entries."""
    oldest = now_ms - ECHO_MAX_AGE_MS
    kept = [p for p in pending if p.written_ms >= oldest]
    return tuple(kept[-ECHO_MAX_ENTRIES:])


def record_write(
    pending: Sequence[PendingWrite],
    state: UserData,
    written_ms: int,
    replaced: UserData | None = None,
) -> tuple[PendingWrite, ...]:
    """Return ``pending`` with a write of ``state`` over ``replaced`` appended, within bounds."""
    return prune((*pending, PendingWrite(state, written_ms, replaced)), written_ms)


def match_echo(
    pending: Sequence[PendingWrite],
    incoming: UserData,
    now_ms: int,
    *,
    consume: bool = True,
    read_at_ms: int | None = None,
) -> EchoMatch:
    """Tell whether ``incoming`` is an echo, a stale event or a change; say what stays pending.

    The oldest pending state equal to ``incoming`` makes it an echo; with ``consume`` that entry
    and every older one are removed. Failing that, the oldest entry whose replaced state equals
    ``incoming`` makes it stale; with ``consume`` only the entries older than that one are
    removed. With ``read_at_ms`` (a read requested then), entries recorded before it are not
    matched. Expired entries are dropped either way.
    """
    live = prune(pending, now_ms)
    floor = read_at_ms
    for index, entry in enumerate(live):
        if entry.state == incoming and (floor is None or entry.written_ms >= floor):
            return EchoMatch(Verdict.ECHO, live[index + 1 :] if consume else live)
    for index, entry in enumerate(live):
        if entry.replaced == incoming and (floor is None or entry.written_ms >= floor):
            return EchoMatch(Verdict.STALE, live[index:] if consume else live)
    return EchoMatch(Verdict.CHANGE, live)
