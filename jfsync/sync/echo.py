"""The echo rule: telling jfsync's own writes apart from user changes, or saying it cannot (pure).

Every user-data save on a Jellyfin server is pushed back to that user's sockets about 500 ms
later (a trailing debounce), with the state read at flush time and no origin or sequence.
jfsync's own writes therefore come back as events, an event flushed *before* a write can still
be on its way when the write is done, and one debounced event can merge jfsync's write with a
user's next action. The rule, per (server, user, item):

* when jfsync writes a state, it records that state as *pending*, with its write time and the
  state it replaced (:func:`record_write`), and the ledger sets it as the last-known state;
* an incoming event is a certain **echo** only when it equals the NEWEST pending state and the
  ledger still believes the server holds that state (its last-known state): the server then
  shows exactly what jfsync last wrote, so nothing the user did can be lost by ignoring it
  (a user who changed something and changed it back inside one debounce left no trace any
  replicator could see). It consumes every pending entry (:func:`classify_event`);
* an event equal to an OLDER pending state, or to a state a pending write *replaced*, is
  **ambiguous**: it may be a stale event (flushed before the write) or the user taking the
  write back. Content cannot tell them apart, so jfsync never guesses: the caller reads the
  item's current state from that server and applies what the read says (a fresh read never
  loses; a guess can). Nothing is consumed;
* any other state is a real **change**, diffed register by register against the last-known
  state, so an echo that also carries a user's change still shows that change;
* pending states older than :data:`ECHO_MAX_AGE_MS` are dropped, and at most
  :data:`ECHO_MAX_ENTRIES` are kept per key (the newest).

A state *read* from the server (a scan page, the pusher's compare read, the read that settles
an ambiguous event) carries the time it was requested. A scan page is matched against pending
states recorded at or after that time and consumes nothing (:func:`match_echo`). Once a read
requested at ``read_ms`` showed a state, pending entries recorded before ``read_ms`` with any
other state are moot (:func:`after_read`): their echo would have been flushed before the read,
and a later event equal to one of them can only be the user's own action.

The caller makes sure that an observation older than what the ledger already knows of that
(server, user, item) is never applied (the ledger's "seen" times).

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
    AMBIGUOUS = "ambiguous"
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


def classify_event(
    pending: Sequence[PendingWrite],
    incoming: UserData,
    last_known: UserData | None,
    now_ms: int,
) -> EchoMatch:
    """Tell whether an event is a certain echo, ambiguous or a change (see the module doc).

    ECHO (every pending entry consumed) only when ``incoming`` equals the newest live pending
    state and ``last_known``; AMBIGUOUS when it equals an older pending state or a state a
    pending write replaced (nothing consumed: the caller reads the server); else CHANGE.
    """
    live = prune(pending, now_ms)
    if not live:
        return EchoMatch(Verdict.CHANGE, live)
    if live[-1].state == incoming and last_known == incoming:
        return EchoMatch(Verdict.ECHO, ())
    if any(entry.state == incoming or entry.replaced == incoming for entry in live):
        return EchoMatch(Verdict.AMBIGUOUS, live)
    return EchoMatch(Verdict.CHANGE, live)


def after_read(
    pending: Sequence[PendingWrite], state: UserData, read_ms: int, now_ms: int
) -> tuple[PendingWrite, ...]:
    """Drop the pending entries a read requested at ``read_ms`` showing ``state`` made moot.

    An entry recorded before the read with another state can no longer come back as an echo:
    the server held ``state`` when the read was requested, so an event equal to that entry's
    state arriving later is a new save, by the user.
    """
    return tuple(
        entry
        for entry in prune(pending, now_ms)
        if entry.written_ms >= read_ms or entry.state == state
    )
