"""Helpers for the replication tests: emulated clusters, convergence checks and a quiet barrier.

A :class:`Cluster` is the suite's shared cluster (:mod:`tests.support.cluster`) of two or three
emulators generated from the same seed and path root (so they share item ids, as identical
libraries do) with distinct server names, plus the :class:`SyncService` between them. :func:`settle` is the barrier the
no-ping-pong tests rely on: it sends one sentinel change through every server's socket and
waits until every resulting write's echo came back, so every message sent before it has been
applied and any write it caused has been made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp

from jfsync.emulator import Emulator
from jfsync.model import UserData
from jfsync.sync.ledger import Ledger, Observation
from jfsync.timing import ManualClock
from tests.support.cluster import (
    DEBOUNCE_S,
    FAST_PUSHER,
    FAST_SUBSCRIBER,
    USER,
    fast_delays,
)
from tests.support.cluster import Cluster as BaseCluster
from tests.support.config import API_KEY
from tests.support.gate import SocketGate
from tests.support.waiting import WAIT_S

__all__ = [
    "API_KEY",
    "DEBOUNCE_S",
    "FAST_PUSHER",
    "FAST_SUBSCRIBER",
    "USER",
    "USER_KEY",
    "WAIT_S",
    "Cluster",
    "SocketGate",
    "UserClient",
    "fast_delays",
    "new_emulator",
    "untouched_on_a_and_b",
]

#: The canonical key jfsync gives a user matched by name.
USER_KEY = f"name:{USER}"


async def untouched_on_a_and_b(
    ledger: Ledger, clock: ManualClock, b: Emulator, count: int
) -> list[str]:
    """For a pusher test against ``b`` alone: map :data:`USER` (b's account, and a's
    ``a-user``) to :data:`USER_KEY`, and record b's first ``count`` leaf items as holding
    nothing on either server (a scan), so that what the user does after is a plain change.
    Returns those items."""
    await ledger.map_user("a", "a-user", USER_KEY)
    await ledger.map_user("b", b.user_id(USER), USER_KEY)
    items = [leaf.id for leaf in b.leaf_items()[:count]]
    await ledger.apply_observations(
        [
            Observation(server, USER_KEY, item, UserData(), clock.wall_ms(), "scan")
            for server in ("a", "b")
            for item in items
        ]
    )
    return items


def new_emulator(
    name: str, leaves: int = 40, debounce_s: float = DEBOUNCE_S, **kw: Any
) -> Emulator:
    """An emulator sharing the library layout (and so the item ids) of every other one."""
    return Emulator(
        api_key=API_KEY,
        server_name=name,
        library_size=leaves,
        seed=7,
        debounce_s=debounce_s,
        **kw,
    )


class Cluster(BaseCluster):
    """The shared cluster with the replication tests' vocabulary (emulators as a list)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sentinel_round = 0
        #: The emulators in config order (a test may swap one for a reinstalled server).
        self.emus: list[Emulator] = list(self.servers.values())

    def emu(self, server: str | Emulator) -> Emulator:
        """The emulator called ``server`` in :attr:`emus` (an emulator is returned as is)."""
        if isinstance(server, Emulator):
            return server
        return next(e for e in self.emus if e.server_name == server)

    async def wait_connected(self, users: int | None = 2) -> None:
        """Wait until each server has ``users`` live user sockets (resync done)."""
        await super().wait_connected(users)

    @property
    def free_items(self) -> list[str]:
        """Items tests may change (the sentinels are left out)."""
        return self.items[: -len(self.emus)]

    def uid(self, emu: Emulator, user: str = USER) -> str:
        """The user's id on that emulator."""
        return emu.user_id(user)

    def all_hold(self, item: str, expected: UserData, user: str = USER) -> bool:
        """Tell whether every emulator holds ``expected``."""
        return all(self.data(e, item, user) == expected for e in self.emus)

    def agree(self, items: Iterable[str], user: str = USER) -> bool:
        """Tell whether every emulator holds the same data for every item."""
        first = self.emus[0]
        return all(
            self.data(e, i, user) == self.data(first, i, user) for i in items for e in self.emus[1:]
        )

    async def wait_all_hold(self, item: str, expected: UserData, user: str = USER) -> None:
        """Wait until every emulator holds ``expected`` for ``item`` and the echoes are back.

        Waiting for the echoes too keeps the next user action out of the echo window: a user
        who restores, inside one debounce window, exactly the state jfsync just overwrote is
        indistinguishable from a stale event (see :mod:`jfsync.sync.echo`), and no test wants that.
        """
        await self.wait(lambda: self.all_hold(item, expected, user))
        await self.wait_quiet([item], user)

    async def wait_items(
        self,
        emus: Sequence[Emulator],
        items: Sequence[str],
        expected: UserData,
        user: str = USER,
        timeout_s: float = WAIT_S,
    ) -> None:
        """Wait until every emulator in ``emus`` holds ``expected`` for every item.

        Cheap enough to re-check after every write of a large burst: items already seen to
        hold it are not looked at again until the end, where everything is checked once more.
        """
        pending = [(e, i) for e in emus for i in items]

        def done() -> bool:
            while pending:
                emu, item = pending[-1]
                if self.data(emu, item, user) != expected:
                    return False
                pending.pop()
            if all(self.data(e, i, user) == expected for e in emus for i in items):
                return True
            pending.extend((e, i) for e in emus for i in items)
            return False

        await self.wait(done, timeout_s)

    async def key(self, server: str, item: str) -> str:
        """The canonical key jfsync gives ``server``'s item ``item`` (usually the id itself;
        ``<server>:<id>`` when the plain id was taken while the libraries were indexed)."""
        found = await self.service.identity.canonical_items(server, [item])
        return found.get(item, item)

    async def pending(self, server: str, item: str, user: str = USER) -> tuple[Any, ...]:
        """jfsync's writes to ``server`` for ``item`` whose echo it still awaits."""
        key = await self.key(server, item)
        return await self.service.ledger.pending_echoes(server, f"name:{user}", key)

    async def is_quiet(self, items: Iterable[str], user: str = USER) -> bool:
        """Nothing queued or in flight, no echo pending for ``items``, no push armed."""
        ledger = self.service.ledger
        wanted = list(items)
        for link in self.service.links.values():
            if link.pusher.in_flight or await ledger.outbox_depth(link.name):
                return False
            for item in wanted:
                if await self.pending(link.name, item, user):
                    return False
        return not any(e.pushes_pending for e in self.emus)

    async def wait_quiet(self, items: Iterable[str], user: str = USER) -> None:
        """Wait until :meth:`is_quiet` holds."""
        wanted = list(items)
        await self.wait(lambda: self.is_quiet(wanted, user))

    async def settle(self, user: str = USER) -> None:
        """Wait until everything sent so far was applied and every write it caused was made.

        One sentinel change per server goes through that server's socket after everything
        else; once every server holds every sentinel and no echo of jfsync's writes is still
        expected, every earlier message has been applied (messages of one socket are applied
        in order) and nothing is queued or in flight.
        """
        self._sentinel_round += 1
        sentinels = self.items[-len(self.emus) :]
        expected: dict[str, UserData] = {}
        for emu, item in zip(self.emus, sentinels, strict=True):
            if self.manual_clocks:
                # Those emulators flush only when told: nothing under way moves until then.
                expected[item] = self.change(emu, item, user, play_count=self._sentinel_round)
                continue

            async def changed(emu: Emulator = emu, item: str = item) -> bool:
                if not await self._sentinel_clear(emu, item, user):
                    return False
                # No await since the check: nothing of jfsync's ran in between.
                expected[item] = self.change(emu, item, user, play_count=self._sentinel_round)
                return True

            await self.wait(changed)
        if self.manual_clocks:
            # Those emulators flush only when told: first the sentinels, then the echoes.
            await self.flush_manual()
            await self.wait(lambda: all(self.all_hold(i, s, user) for i, s in expected.items()))
            await self.flush_manual()

        async def quiet() -> bool:
            if not all(self.all_hold(i, s, user) for i, s in expected.items()):
                return False
            return await self.is_quiet(expected, user)

        await self.wait(quiet)

    async def _sentinel_clear(self, emu: Emulator, item: str, user: str) -> bool:
        """Tell whether jfsync has no write of ``item`` to ``emu`` under way or coming back.

        A sentinel is a device of the harness, not a user action under test, so it keeps out
        of a documented limit (README, "Known limits"): a change made on a server between
        jfsync's compare read of an item there and its write of that item is overwritten,
        Jellyfin having no conditional write. A backlog (a catch-up's backfill, a burst) is
        read one batch ahead of its writes, so that window can be a tenth of a second. So the
        sentinel waits until no row of that item is queued for that server (its write is
        recorded, or it waits for a hold to be lifted or a dead row to be revived, and then
        is read again), then until the write's echo is back (a change merged with it into one
        message would leave the echo pending).
        """
        name = emu.server_name
        user_key = f"name:{user}"
        key = await self.key(name, item)
        ledger = self.service.ledger
        if not self.service.reset_guard.is_held(name, user_key):
            # The row first: it leaves the outbox in the transaction that records the write's
            # pending echo, so the echo's check below cannot miss it.
            row = await ledger.get_row(name, user_key, key)
            if row is not None and not row.dead:
                return False
        return not await ledger.pending_echoes(name, user_key, key)

    async def flush_manual(self) -> None:
        """Let every emulator on a ManualClock flush its armed UserDataChanged push."""
        for name, clock in self.manual_clocks.items():
            await clock.advance(self.emu(name).hub.debounce_s)


class UserClient:
    """A Jellyfin client acting as one user over HTTP (favourites, playback), not as jfsync."""

    def __init__(self, session: aiohttp.ClientSession, emu: Emulator, user: str = USER) -> None:
        self.session = session
        self.emu = emu
        self.user_id = emu.user_id(user)
        device = f"player-{emu.server_name}-{user}"
        token = emu.user_token(user, client="pytest-player", device_id=device)
        self.headers = {
            "Authorization": 'MediaBrowser Client="pytest-player", Device="pytest", '
            f'DeviceId="{device}", Version="1.0", Token="{token}"'
        }

    async def call(self, method: str, path: str, body: Any = None) -> int:
        """Send one request as the user and return the status."""
        async with self.session.request(
            method, self.emu.url + path, headers=self.headers, json=body
        ) as response:
            await response.read()
            return response.status

    async def favorite(self, item: str, on: bool) -> None:
        """Mark or unmark a favourite, as the web client does."""
        status = await self.call("POST" if on else "DELETE", f"/UserFavoriteItems/{item}")
        assert status == 200, status

    async def play_and_stop(self, item: str, position_ticks: int) -> None:
        """Start playback, then stop at ``position_ticks``, as a player reports it."""
        assert await self.call("POST", "/Sessions/Playing", {"ItemId": item}) == 204
        stopped = {"ItemId": item, "PositionTicks": position_ticks}
        assert await self.call("POST", "/Sessions/Playing/Stopped", stopped) == 204
