"""The echo rule: telling jfsync's own writes apart from user changes, by content (pure).

Every user-data save on a Jellyfin server is pushed back to that user's sockets about 500 ms
later (a trailing debounce), with the state read at flush time and no origin. jfsync's own
writes therefore come back as events. The rule, per (server, user, item):

* when jfsync writes a state, it records that state as *pending*, with its write time
  (:func:`record_write`), and the ledger sets it as the last-known state;
* an incoming event whose state equals a pending state is an echo: it consumes that pending
  state and every older one of the key, and is not a change (:func:`match_echo`). Matching the
  newest equal entry covers a debounced echo that merged several writes (it equals the newest)
  and a stale echo that arrives after a newer write (it equals an older one and only consumes
  up to it, so the newer write's echo is still recognised);
* any other state is a real change, diffed register by register against the last-known state,
  so an echo that also carries a user's change still shows that change;
* pending states older than :data:`ECHO_MAX_AGE_MS` are dropped, and at most
  :data:`ECHO_MAX_ENTRIES` are kept per key (the newest).

A state *read* from the server (a scan page or the pusher's compare-before-write) that equals a
pending state is not a change either, but it consumes nothing (``consume=False``): an echo of
an older write may still be on its way and must still be recognised.

Times are wall-clock milliseconds passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jfsync.model import UserData

#: Echoes arrive ~0.5 s after the last write of a burst; a minute covers slow sockets and
#: server stalls, and a pending state that old is no longer worth matching.
ECHO_MAX_AGE_MS = 60_000

#: One write per outbox row at a time keeps this short; 8 covers rapid re-writes of one key.
ECHO_MAX_ENTRIES = 8


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A state jfsync wrote to one (server, user, item) whose echo has not been seen yet."""

    state: UserData
    written_ms: int


@dataclass(frozen=True, slots=True)
class EchoMatch:
    """The verdict on an incoming state and the pending writes that remain after it."""

    is_echo: bool
    pending: tuple[PendingWrite, ...]


def prune(pending: Sequence[PendingWrite], now_ms: int) -> tuple[PendingWrite, ...]:
    """Drop pending writes older than the age bound and keep only the newest entries."""
    kept = tuple(p for p in pending if now_ms - p.written_ms <= ECHO_MAX_AGE_MS)
    return kept[-ECHO_MAX_ENTRIES:]


def record_write(
    pending: Sequence[PendingWrite], state: UserData, written_ms: int
) -> tuple[PendingWrite, ...]:
    """Return ``pending`` with a write of ``state`` at ``written_ms`` appended, within bounds."""
    return prune((*pending, PendingWrite(state, written_ms)), written_ms)


def match_echo(
    pending: Sequence[PendingWrite],
    incoming: UserData,
    now_ms: int,
    *,
    consume: bool = True,
) -> EchoMatch:
    """Tell whether ``incoming`` is an echo of a pending write, and what stays pending.

    The newest pending state equal to ``incoming`` matches; with ``consume`` it and every older
    entry are removed. Expired entries are dropped either way.
    """
    live = prune(pending, now_ms)
    for index in range(len(live) - 1, -1, -1):
        if live[index].state == incoming:
            return EchoMatch(True, live[index + 1 :] if consume else live)
    return EchoMatch(False, live)
