"""The reset guard: a server that lost a user's data never wipes that user's data elsewhere.

A catch-up scan (:meth:`jfsync.sync.reconcile.Reconciler.catch_up`) reads every difference from the
ledger's last-known state as the user's edit. A server brought back with the same server and
user ids but empty user data (a reinstall on the same config, an old backup, a failed
migration) would therefore have every item it lost reset on every other server. The guard
tells the two apart, per (server, user), at every catch-up:

* **regressed items**: items whose last-known state on that server was not the default in a
  synced register and that the server now shows entirely default (never touched);
* **the rule** (:meth:`ResetRule.fires`): the server lost the user's data when at least
  ``sync.reset_guard_min_items`` items (default 5) regressed at once AND they are at least
  ``sync.reset_guard_fraction`` (default 0.8) of that user's non-default items on that server.
  A wipe regresses (nearly) all of them; a user's bulk action while a socket was down (a
  season of 22 episodes unplayed out of hundreds of watched items) regresses a small share
  and propagates normally. A small library wiped whole (8 watched films) still fires: 8 is
  above the count and 100 % above the share. Below the rule, every regression is an ordinary
  change and propagates, as before.

What happens when it fires is ``sync.reset_guard``:

* ``restore`` (default): the regressed observations are not merged; the server's last-known
  state of those items becomes what it now holds and the canonical state is queued for it
  (:meth:`jfsync.sync.ledger.Ledger.rebase_last_known`), so the pusher writes it back
  through the normal outbox (retries, echoes, crash safety). Other differences in the same
  scan (items changed to something non-default) are ordinary changes.
* ``hold``: nothing is applied or delivered for that (server, user) and a hold is stored in
  the ledger (it survives restarts). While held, that server's events and scans for that user
  are ignored and rows owed to it for that user wait; everything else (other users, other
  servers) syncs. ``jfsync accept-reset SERVER [--user U]`` resolves it: the next catch-up
  takes the server's state as the user's (it propagates); with ``--restore`` it restores the
  server as ``restore`` would, whatever the rule says.
* ``off``: no guard; every regression propagates.

Either way the trigger is logged once at WARNING (server, user, how many items, what was done,
how to override), listed on ``/status`` (``reset_guard``) and counted in the metrics.

:class:`ResetGuard` holds the rule, the holds (mirrored in memory for the event path) and the
record of triggers; the catch-up asks it what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jfsync.config import Config
from jfsync.model import Register, UserData
from jfsync.sync.ledger import Ledger, ResetHold
from jfsync.timing import Clock

logger = logging.getLogger(__name__)

Mode = Literal["restore", "hold", "off"]
Resolution = Literal["accept", "restore"]
#: Triggers kept for the status page (the newest; older ones only in the counters and log).
RECENT_TRIGGERS = 20


@dataclass(frozen=True, slots=True)
class ResetRule:
    """When a catch-up's regressions are a lost server, and what to do then."""

    mode: Mode = "restore"
    min_items: int = 5
    fraction: float = 0.8

    @classmethod
    def from_config(cls, config: Config) -> ResetRule:
        """The rule of the ``sync.reset_guard*`` keys."""
        sync = config.sync
        return cls(sync.reset_guard, sync.reset_guard_min_items, sync.reset_guard_fraction)

    def fires(self, regressed: int, non_default: int) -> bool:
        """Tell whether ``regressed`` of ``non_default`` known items back to default is a loss."""
        if self.mode == "off" or regressed == 0:
            return False
        return regressed >= self.min_items and regressed >= self.fraction * non_default


def regressed_items(
    known: Mapping[str, UserData],
    observed: Mapping[str, UserData],
    synced: Iterable[Register],
) -> list[str]:
    """Items whose known state was touched (synced registers) and whose observed one is default."""
    registers = tuple(synced)
    return sorted(
        item
        for item, state in observed.items()
        if state.is_default and item in known and known[item].holds_data(registers)
    )


@dataclass(frozen=True, slots=True)
class Trigger:
    """One time the guard fired."""

    server: str
    user: str
    items: int
    known: int
    at_ms: int
    #: ``restored`` or ``held``.
    action: str


class ResetGuard:
    """The rule, the holds and what the guard did, for one service (or one reconcile run)."""

    def __init__(self, rule: ResetRule, ledger: Ledger, clock: Clock) -> None:
        self.rule = rule
        self._ledger = ledger
        self._clock = clock
        self._held: set[tuple[str, str]] = set()
        self.triggers: dict[tuple[str, str], int] = {}
        self.recent: list[Trigger] = []

    def __repr__(self) -> str:
        return f"<ResetGuard {self.rule.mode} held={sorted(self._held)}>"

    async def load(self) -> None:
        """Read the holds stored in the ledger (after it opened)."""
        self._held = {(h.server, h.user) for h in await self._ledger.reset_holds()}

    def is_held(self, server: str, user: str) -> bool:
        """Tell whether events and scans of ``user`` on ``server`` are ignored."""
        return (server, user) in self._held

    async def hold_of(self, server: str, user: str) -> ResetHold | None:
        """The stored hold of ``user`` on ``server``, if any."""
        if (server, user) not in self._held:
            return None
        return next(
            (h for h in await self._ledger.reset_holds() if (h.server, h.user) == (server, user)),
            None,
        )

    async def hold(self, server: str, user: str, items: int, known: int) -> None:
        """Hold ``user`` on ``server`` after a wipe was found; warn once."""
        now_ms = self._clock.wall_ms()
        await self._ledger.hold_reset(server, user, items=items, known=known, since_ms=now_ms)
        self._held.add((server, user))
        self._count(Trigger(server, user, items, known, now_ms, "held"))
        logger.warning(
            "[%s] user %s: %d of the %d items with data on %s now read as never touched: the "
            "server lost this user's data (reinstall, old backup?), not the user's edit. "
            "HOLDING (sync.reset_guard: hold): nothing is synced from or to %s for this user "
            "until you run `jfsync accept-reset %s --user %s` (the wiped state becomes the "
            "user's, on every server) or add --restore (write the other servers' state back)",
            server,
            user,
            items,
            known,
            server,
            server,
            server,
            _short(user),
        )

    def restored(self, server: str, user: str, items: int, known: int, queued: int) -> None:
        """Note a restore done by the catch-up; warn once."""
        now_ms = self._clock.wall_ms()
        self._count(Trigger(server, user, items, known, now_ms, "restored"))
        logger.warning(
            "[%s] user %s: %d of the %d items with data on %s now read as never touched: the "
            "server lost this user's data (reinstall, old backup?), not the user's edit. "
            "RESTORING (sync.reset_guard: restore): nothing was propagated; %d items are "
            "written back to %s from the other servers. If the user really cleared them, clear "
            "them again after the restore, or set sync.reset_guard: hold to decide by hand "
            "(`jfsync accept-reset`) next time",
            server,
            user,
            items,
            known,
            server,
            queued,
            server,
        )

    async def resolved(self, server: str, user: str, resolution: str, items: int) -> None:
        """A resolution was applied by a catch-up: drop the hold."""
        await self._ledger.drop_reset_hold(server, user)
        self._held.discard((server, user))
        what = (
            f"{server}'s state was taken as the user's ({items} items propagated)"
            if resolution == "accept"
            else f"{items} items are written back to {server} from the other servers"
        )
        logger.warning("[%s] user %s: reset hold resolved (%s): %s", server, user, resolution, what)

    def forget_server(self, server: str) -> None:
        """The server is a new one (its holds were dropped with its history)."""
        self._held = {k for k in self._held if k[0] != server}

    def _count(self, trigger: Trigger) -> None:
        key = (trigger.server, trigger.action)
        self.triggers[key] = self.triggers.get(key, 0) + 1
        self.recent = [*self.recent, trigger][-RECENT_TRIGGERS:]

    async def status(self) -> dict[str, Any]:
        """The ``reset_guard`` section of ``/status``."""
        holds = await self._ledger.reset_holds()
        return {
            "mode": self.rule.mode,
            "min_items": self.rule.min_items,
            "fraction": self.rule.fraction,
            "holds": [
                {
                    "server": h.server,
                    "user": h.name or _short(h.user),
                    "items": h.items,
                    "known": h.known,
                    "since_ms": h.since_ms,
                    "resolution": h.resolution,
                }
                for h in holds
            ],
            "triggers": [
                {
                    "server": t.server,
                    "user": _short(t.user),
                    "items": t.items,
                    "known": t.known,
                    "at_ms": t.at_ms,
                    "action": t.action,
                }
                for t in self.recent
            ],
            "trigger_counts": [
                {"server": server, "action": action, "count": count}
                for (server, action), count in sorted(self.triggers.items())
            ],
        }


def _short(user: str) -> str:
    """A canonical user key as people name the user (``name:alice`` -> ``alice``)."""
    return user.removeprefix("name:")


def describe_hold(hold: ResetHold) -> str:
    """One line for a hold, for the CLI and logs."""
    who = hold.name or _short(hold.user)
    state = "held" if hold.resolution is None else f"decided: {hold.resolution}"
    return f"{hold.server}/{who}: {hold.items} of {hold.known} items wiped; {state}"


__all__ = [
    "ResetGuard",
    "ResetRule",
    "Trigger",
    "describe_hold",
    "regressed_items",
]
