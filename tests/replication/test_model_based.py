"""Nothing a user did is lost: random schedules of user actions, checked against a model.

Each schedule runs real emulators (two or three servers, users ``alice`` and ``bob``) and the
real :class:`SyncService` in this process, on one :class:`ManualClock` (jfsync's clock: the
test decides when time passes, so stamps are exact; the emulators keep the real clock for
their short echo debounce). A schedule is a series of *rounds*; each round creates one
situation at the worst moment and makes user actions in it (favourite on/off, rate/clear,
mark played/unplayed, playback stopped at a resume position, each changing what that server
shows at that moment):

* ``after-write``: the user acts on a server inside the echo debounce right after jfsync's
  write landed there (from the emulators' request observer, before jfsync has its answer),
  usually taking the write back;
* ``scan``: a server answers slowly, its sockets drop, and users act while jfsync's catch-up
  scan of it is in flight (at a listing request);
* ``reconcile``: every server answers slowly, a full reconcile runs and a user acts on an item
  of the listing just answered (whose live event is applied before the listing is);
* ``compare``: a user acts on a server while jfsync's compare-before-write read of it is
  answered; the answer is held in a proxy until the action's live event was applied;
* ``peer-down``: a server stops listening; users act there and elsewhere; it comes back;
* ``sockets``: a server drops or half-opens its sockets while users act;
* ``crash``: jfsync stops with no grace at one of its requests, users act while it is down,
  and a new service starts on the same ledger;
* ``wipe``: a server loses one or every user's data while down (not a user action: the reset
  guard must restore it, never spread it);
* ``plain``: actions on random servers, each after jfsync's next requests.

After each round a quiet barrier (sentinel changes through every socket of every user, then
nothing queued, in flight or awaiting an echo; the manual clock is advanced only while
nothing else moves) is followed by the check: every register of every (user, item) on EVERY
server must hold a value the model (:mod:`tests.replication.model`) accepts, not merely agree.
Then the clock moves 1.5 s, so the next round's actions come later than this round's by the
design's 1 s rule. At the end, jfsync's writes per (server, user, item) are checked against
the actions that required them (no ping-pong).

A failure prints the seed, the schedule and the expected and actual values per server; replay
with the command it prints (``JFSYNC_MODEL_SEED=<seed>`` keeps only that seed). The
soak (``-m slow``) runs ``JFSYNC_MODEL_SOAK_SEEDS`` seeds (default 12, about 4 minutes) of
longer schedules; ``JFSYNC_MODEL_SKIP`` leaves situations out (see :func:`situations`).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jfsync import emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord
from jfsync.model import TICKS_PER_SECOND, PlayState, Register, UserData
from jfsync.service import SyncService
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import FAST_SUBSCRIBER, Cluster
from tests.replication.model import Model, show

#: Users acting (the emulators' two accounts).
USERS = ["alice", "bob"]
#: Real-time bound for one barrier or one situation's wait (loopback I/O; never time itself).
LIMIT_S = 30.0
#: Real time with nothing happening after which the barrier moves jfsync's clock on.
IDLE_S = 0.1
#: jfsync's clock between rounds: more than the design's 1 s.
ROUND_GAP_S = 1.5
#: Short keepalives (on the manual clock) so a half-open socket is found within a barrier.
SUBSCRIBER_OPTIONS: dict[str, Any] = {
    **FAST_SUBSCRIBER,
    "keepalive_interval_s": 4.0,
    "keepalive_timeout_s": 3.0,
}
BASE_DATE = datetime(2024, 6, 1, tzinfo=UTC)
#: The reset guard's default: a wipe is only told from a user's resets when at least this many
#: items went back to default at once (fewer are indistinguishable from the user's own resets,
#: so the schedule only wipes a server whose user has this many non-default items).
RESET_GUARD_MIN_ITEMS = 5
SITUATIONS = (
    "after-write",
    "after-write",
    "scan",
    "reconcile",
    "compare",
    "peer-down",
    "sockets",
    "crash",
    "wipe",
    "plain",
)
#: Extra write requests allowed per (server, user, item) beyond what the actions explain.
WRITE_SLACK = 3
#: Write requests one row may take (DELETE rating, DELETE played, POST).
REQUESTS_PER_WRITE = 3

pytestmark = pytest.mark.timeout(600)


@dataclass
class Schedule:
    """What one seed runs."""

    seed: int
    servers: int
    rounds: int
    items: int
    #: Which test runs it (for the replay command).
    test: str = "fast_slice"

    def replay(self) -> str:
        """The command that runs this schedule again, failing hard."""
        slow = " -m slow" if self.test == "soak" else ""
        case = f"{self.servers}-{self.seed}" if self.test == "fast_slice" else str(self.seed)
        return (
            f"JFSYNC_MODEL_SEED={self.seed} .venv/bin/pytest "
            f'tests/replication/test_model_based.py{slow} -k "{self.test} and {case}"'
        )


Hook = Callable[[Emulator, RequestRecord], bool]


@dataclass
class Run:
    """One schedule against one cluster: actions, situations, barrier, checks."""

    cluster: Cluster
    clock: ManualClock
    rng: random.Random
    schedule: Schedule
    model: Model
    items: list[str]
    hooks: list[Hook] = field(default_factory=list)
    requests: int = 0
    request_event: asyncio.Event = field(default_factory=asyncio.Event)
    counter: int = 0
    sentinel: int = 0
    wipes: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    seen_writes: dict[str, int] = field(default_factory=dict)
    situations: Counter[str] = field(default_factory=Counter)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    #: What every server showed before the coming writes (server -> (user, item) -> state).
    before: dict[str, dict[tuple[str, str], UserData]] = field(default_factory=dict)
    #: Failures inside hooks (they run in the emulator's request path: raised later).
    errors: list[BaseException] = field(default_factory=list)

    @property
    def service(self) -> SyncService:
        """The running service (a new one after each crash)."""
        return self.cluster.service

    @property
    def emus(self) -> list[Emulator]:
        """The servers."""
        return self.cluster.emus

    # ------------------------------------------------------------------ observing jfsync

    def observe(self, emu: Emulator, record: RequestRecord) -> None:
        """Request observer: track jfsync's writes in the model, run the armed hooks."""
        name = emu.server_name
        seen = self.seen_writes.get(name, 0)
        for write in emu.writes[seen:]:
            if (
                write.client == "jfsync"
                and write.status < 300
                and write.user_id in emu.users
                and write.item_id in self.items
            ):
                assert write.item_id is not None
                assert write.user_id is not None
                user = emu.users[write.user_id].name
                state = emu.user_data(write.user_id, write.item_id)
                self.model.jfsync_wrote(name, user, write.item_id, state)
        self.seen_writes[name] = len(emu.writes)
        if record.client != "jfsync":
            return
        self.requests += 1
        self.request_event.set()
        for hook in list(self.hooks):
            try:
                done = hook(emu, record)
            except Exception as err:  # raised by the round, not in the emulator's handler
                self.errors.append(err)
                done = True
            if done:
                self.hooks.remove(hook)

    async def next_requests(self, count: int) -> None:
        """Let jfsync make ``count`` more requests, or go idle (then go on at once)."""
        target = self.requests + count
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_S
        while self.requests < target:
            self.request_event.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self.request_event.wait()
            except TimeoutError:
                return
            deadline = loop.time() + IDLE_S

    # ------------------------------------------------------------------ user actions

    def act(
        self,
        emu: Emulator,
        situation: str,
        user: str | None = None,
        item: str | None = None,
        register: Register | None = None,
        back_to: Any = ...,
    ) -> None:
        """Make one user action on ``emu`` that changes what it shows, and record it.

        ``back_to``: the value the user restores (taking jfsync's write back), where a user
        can: a favourite flips, a rating is set to it or cleared, a play state is unplayed
        when it was the default (any other play state cannot be typed in by a user: a fresh
        play action is made instead).
        """
        user = user or self.rng.choice(USERS)
        item = item or self.rng.choice(self.items)
        register = register or self.rng.choice(list(Register))
        uid = emu.user_id(user)
        now = emu.user_data(uid, item)
        if back_to is not ... and back_to == now.get(register):
            back_to = ...  # the server already shows it (the write left this register alone)
        self.counter += 1
        n = self.counter
        value: Any
        if register is Register.FAVORITE:
            value = not now.favorite
            emu.save_user_data(uid, item, "UpdateUserData", is_favorite=value)
            what = "favourite on" if value else "favourite off"
        elif register is Register.RATING:
            if back_to is not ...:
                value = back_to
            elif now.rating is not None and self.rng.random() < 0.3:
                value = None
            else:
                value = ((n * 37) % 999 + 1) / 100  # unique per schedule (n < 999)
                while value == now.rating:  # the server shows it already (restored, say)
                    self.counter += 1
                    value = ((self.counter * 37) % 999 + 1) / 100
            if value is None:
                emu.save_user_data(uid, item, "UpdateUserRating", clear_rating=True)
                what = "clear rating"
            else:
                emu.save_user_data(uid, item, "UpdateUserRating", rating=value)
                what = f"rate {value}"
        else:
            value, what = self._play(emu, uid, item, now.play_state, n, back_to)
        after = emu.user_data(uid, item)
        assert after.get(register) == value, (register, after, value)
        assert after.get(register) != now.get(register), f"not a change: {what} on {now}"
        self.model.record(emu.server_name, user, item, register, value, what, situation)

    def _play(
        self, emu: Emulator, uid: str, item: str, now: PlayState, n: int, back_to: Any
    ) -> tuple[PlayState, str]:
        """A play-state action: mark played, mark unplayed, or a playback stopped."""
        choices = ["played", "stopped"] + (["unplayed"] if now != PlayState() else [])
        kind = self.rng.choice(choices)
        if back_to == PlayState() and now != PlayState():
            kind = "unplayed"
        date = BASE_DATE + timedelta(seconds=n)  # unique per action: play states are unique
        if kind == "unplayed":
            emu.save_user_data(
                uid,
                item,
                "TogglePlayed",
                played=False,
                play_count=0,
                clear_last_played=True,
                position_ticks=0,
            )
            return PlayState(), "mark unplayed"
        count = now.play_count + 1
        if kind == "played":
            emu.save_user_data(
                uid,
                item,
                "TogglePlayed",
                played=True,
                play_count=count,
                last_played=date,
                position_ticks=0,
            )
            return PlayState(True, count, int(date.timestamp()), 0), "mark played"
        # A player's start then stop (two saves, one debounced event).
        ticks = (60 + n) * TICKS_PER_SECOND
        emu.save_user_data(
            uid, item, "PlaybackStart", played=False, play_count=count, last_played=date
        )
        emu.save_user_data(uid, item, "PlaybackFinished", position_ticks=ticks)
        return (
            PlayState(False, count, int(date.timestamp()), ticks),
            f"playback stopped at {60 + n} s",
        )

    def random_emu(self, but: Emulator | None = None) -> Emulator:
        """A server (other than ``but``)."""
        return self.rng.choice([e for e in self.emus if e is not but])

    async def some_actions(self, situation: str, count: int, on: list[Emulator]) -> None:
        """``count`` actions on random servers of ``on``, each after jfsync's next requests."""
        for _ in range(count):
            self.act(self.rng.choice(on), situation)
            await self.next_requests(self.rng.randint(0, 4))

    # ------------------------------------------------------------------ the service

    async def start_service(self) -> None:
        """Start a new service on the cluster's config and ledger."""
        async with asyncio.timeout(LIMIT_S):
            await self.cluster.start_service(
                config=self.cluster.service.config,
                clock=self.clock,
                connect=False,
                subscriber_options=SUBSCRIBER_OPTIONS,
            )

    async def stop_service(self, grace_s: float) -> None:
        """Stop the running service with ``grace_s`` (0: writes under way are cut off)."""
        service = self.service
        sync = service.config.sync.model_copy(update={"shutdown_grace": grace_s})
        service.config = service.config.model_copy(update={"sync": sync})
        async with asyncio.timeout(LIMIT_S + grace_s):
            await service.stop()

    # ------------------------------------------------------------------ waiting

    async def drive(self, predicate: Callable[[], bool | Awaitable[bool]], what: str) -> None:
        """Wait until ``predicate`` holds; while nothing moves, move jfsync's clock on.

        Reconnect delays, retries and probes run on the manual clock; they only fire when it
        moves, and it moves only after ``IDLE_S`` of real time in which jfsync did nothing
        that made the predicate true.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LIMIT_S
        step = 0.05
        while True:
            try:
                await self.service.wait_for(predicate, IDLE_S)
                return
            except TimeoutError:
                if loop.time() > deadline:
                    state = await self.diagnose()
                    problems = self.model.check(self.shown(), USERS, self.items)
                    problems.append(f"never reached: {what} ({state})")
                    pytest.fail(self.report(problems), pytrace=False)
            await self.clock.advance(step)
            step = min(step * 2, 1.0)

    async def diagnose(self) -> str:
        """What is still moving: sockets, queues, writes in flight, echoes awaited."""
        ledger = self.service.ledger
        parts = []
        for name, link in self.service.links.items():
            states = {s.user_name: str(s.status.state) for s in link.subscribers.values()}
            pending = {
                (u, i[:6]): len(await self.cluster.pending(name, i, u))
                for u in USERS
                for i in [*self.items, *self.cluster.items[-len(self.emus) :]]
            }
            parts.append(
                f"{name}: sockets {states}, outbox {await ledger.outbox_depth(name)}, "
                f"in flight {link.pusher.in_flight}, echoes awaited "
                f"{ {k: v for k, v in pending.items() if v} }"
            )
        pushes = [e.server_name for e in self.emus if e.pushes_pending]
        differ = {
            f"{u}/{i[:6]}": {e.server_name: self.cluster.data(e, i, u) for e in self.emus}
            for u in USERS
            for i in self.cluster.items[-len(self.emus) :]
            if not self.cluster.agree([i], u)
        }
        return "; ".join(parts) + f"; pushes armed on {pushes}; sentinels that differ {differ}"

    def connected(self) -> bool:
        """Every user's socket on every server is connected (its catch-up done)."""
        return all(
            len(link.subscribers) == len(USERS)
            and all(str(s.status.state) == "connected" for s in link.subscribers.values())
            for link in self.service.links.values()
        )

    async def barrier(self) -> None:
        """Quiet: every message sent so far applied, every write made, nothing in flight.

        Two passes of sentinel changes (one per server and user, on items the schedule never
        touches): a socket's messages are applied in order, so once the second pass reached
        every server, every event sent before it (the echoes of the first pass's writes
        included) was applied, and nothing is queued or written any more. Echoes still awaited
        for the schedule's items are not waited for: a user who overwrote jfsync's write
        inside the debounce leaves one that never comes (the check then finds what was lost).
        """
        await self.drive(self.connected, "every socket connected")
        for final in (False, True):
            for user in USERS:
                await self.sentinel_pass(user, final)

    async def idle(self) -> bool:
        """jfsync has nothing queued and nothing in flight to any server."""
        ledger = self.service.ledger
        for name, link in self.service.links.items():
            if link.pusher.in_flight or await ledger.outbox_depth(name):
                return False
        return True

    async def sentinel_pass(self, user: str, final: bool) -> None:
        """Change every server's sentinel item for ``user``; wait until it is everywhere.

        The sentinels are changed only once jfsync is idle: a change landing between jfsync's
        compare read of a server and its write there is overwritten by the write (Jellyfin has
        no conditional write; docs/design-notes.md), and the barrier is not the schedule's
        place to provoke that (the restore after a wipe queues writes right as it starts).
        """
        await self.drive(self.idle, f"jfsync idle before the sentinels of round {self.model.round}")
        sentinels = self.cluster.items[-len(self.emus) :]
        self.sentinel += 1
        expected: dict[str, UserData] = {}
        for emu, item in zip(self.emus, sentinels, strict=True):
            expected[item] = self.cluster.change(emu, item, user, play_count=self.sentinel)

        async def quiet() -> bool:
            if not all(self.cluster.all_hold(i, s, user) for i, s in expected.items()):
                return False
            if not self.connected() or any(e.pushes_pending for e in self.emus):
                return False
            ledger = self.service.ledger
            for name, link in self.service.links.items():
                if link.pusher.in_flight or await ledger.outbox_depth(name):
                    return False
                if final:
                    # An echo of jfsync's write that the server still shows may be in transit;
                    # one of a state the server no longer shows (the user overwrote the write
                    # inside the debounce) never comes, and jfsync treats it as moot.
                    emu = self.cluster.emu(name)
                    for item in sentinels:
                        shows = self.cluster.data(emu, item, user)
                        awaited = await self.cluster.pending(name, item, user)
                        if any(p.state == shows for p in awaited):
                            return False
            return True

        await self.drive(quiet, f"quiet after round {self.model.round} ({user})")

    def shown(self) -> dict[str, dict[tuple[str, str], UserData]]:
        """What every server shows for every (user, item) of the model."""
        return {
            emu.server_name: {
                (user, item): self.cluster.data(emu, item, user)
                for user in USERS
                for item in self.items
            }
            for emu in self.emus
        }

    def report(self, problems: list[str]) -> str:
        """The readable failure: seed, schedule, then what is wrong."""
        s = self.schedule
        lines = [
            f"model-based schedule FAILED: seed={s.seed} servers={s.servers}",
            f"replay: {s.replay()}",
            "schedule:",
            *self.model.log,
            "problems after the barrier:",
            *problems,
            "all servers (user item: favourite / rating / play state):",
        ]
        for emu in self.emus:
            for user in USERS:
                for item in self.items:
                    d = self.cluster.data(emu, item, user)
                    lines.append(
                        f"  {emu.server_name} {user} {item[:6]}: {show(d.favorite)} / "
                        f"{show(d.rating)} / {show(d.play_state)}"
                    )
        return "\n".join(lines)

    def check(self) -> None:
        """Fail with the readable report if any server shows a value the model rejects."""
        problems = self.model.check(self.shown(), USERS, self.items)
        if problems:
            pytest.fail(self.report(problems), pytrace=False)

    # ------------------------------------------------------------------ situations

    async def round(self) -> None:
        """One round: a situation with actions in it, the barrier, the check, 1.5 s."""
        self.model.next_round()
        situation = self.rng.choice(situations())
        if situation == "wipe" and not self.wipe_target():
            situation = "plain"
        self.situations[situation] += 1
        await getattr(self, "s_" + situation.replace("-", "_"))()
        self.hooks.clear()
        if self.errors:
            raise self.errors[0]
        for task in self.background:
            async with asyncio.timeout(LIMIT_S):
                await task
        self.background.clear()
        for emu in self.emus:
            emu.set_latency(0.0)
        await self.barrier()
        self.check()
        await self.clock.advance(ROUND_GAP_S)

    async def s_plain(self) -> None:
        await self.some_actions("plain", self.rng.randint(1, 4), self.emus)

    async def s_after_write(self) -> None:
        """The user acts right after jfsync's write landed, inside the echo debounce."""
        fired: list[bool] = []

        def hook(emu: Emulator, record: RequestRecord) -> bool:
            if record.method not in ("POST", "DELETE") or not emu.writes:
                return False
            write = emu.writes[-1]
            if write.client != "jfsync" or write.item_id not in self.items:
                return False
            assert write.user_id is not None
            assert write.item_id is not None
            user = emu.users[write.user_id].name
            self.model.note(f"jfsync's {write.method} landed on {emu.server_name}; user acts")
            register = self.rng.choice(list(Register))
            back_to: Any = ...
            if self.rng.random() < 0.7:
                # Take back what jfsync just wrote: the state it replaced, where a user can.
                before = self._before_write(emu.server_name, user, write.item_id)
                changed = [
                    r
                    for r in Register
                    if before.get(r) != self.cluster.data(emu, write.item_id, user).get(r)
                ]
                if changed:
                    register = self.rng.choice(changed)
                    back_to = before.get(register)
            self.act(emu, "right after jfsync's write", user, write.item_id, register, back_to)
            fired.append(True)
            return True

        self.snapshot_before_writes()
        self.hooks.append(hook)
        origin = self.random_emu()
        self.act(origin, "before a write")
        await self.next_requests(20)
        if not fired:
            await self.some_actions("plain", 1, self.emus)

    def snapshot_before_writes(self) -> None:
        """Remember what every server shows now (the state a coming write replaces)."""
        self.before = self.shown()

    def _before_write(self, server: str, user: str, item: str) -> UserData:
        return self.before.get(server, {}).get((user, item), UserData())

    async def s_scan(self) -> None:
        """Users act while jfsync's catch-up scan of a slow server is in flight."""
        target = self.random_emu()
        at = self.rng.randint(1, 6)
        listings: list[int] = []

        def hook(emu: Emulator, record: RequestRecord) -> bool:
            if emu is not target or record.method != "GET" or not _has(record, "filters"):
                return False
            listings.append(1)
            if len(listings) < at:
                return False
            self.model.note(f"{target.server_name} scan listing #{at} answered; users act")
            self.act(target, f"during the scan of {target.server_name}")
            if self.rng.random() < 0.5:
                self.act(self.random_emu(target), f"during the scan of {target.server_name}")
            return True

        self.hooks.append(hook)
        target.set_latency(0.01)
        self.model.note(f"{target.server_name} slow (10 ms) and drops its sockets")
        try:
            await target.drop_sockets()
            await self.service.wait_for(lambda: not self.connected(), LIMIT_S)
            await self.drive(self.connected, "reconnect after the dropped sockets")
        finally:
            target.set_latency(0.0)
        await self.some_actions("plain", self.rng.randint(0, 1), self.emus)

    async def s_reconcile(self) -> None:
        """Users act while a full reconcile lists a server (slow answers: the live event of
        the action is applied before the reconcile applies what it listed earlier)."""
        at = self.rng.randint(1, 10)
        listings: list[int] = []

        def hook(emu: Emulator, record: RequestRecord) -> bool:
            if record.method != "GET" or not _has(record, "filters"):
                return False
            listings.append(1)
            if len(listings) < at:
                return False
            uid = _query(record, "userid")
            user = emu.users[uid].name if uid in emu.users else self.rng.choice(USERS)
            # An item the listings show (non-default), so the listing holds its old state.
            listed = [i for i in self.items if not self.cluster.data(emu, i, user).is_default]
            item = self.rng.choice(listed or self.items)
            self.model.note(f"reconcile listing #{at} of {emu.server_name} answered; user acts")
            self.act(emu, "during a full reconcile", user, item)
            return True

        self.hooks.append(hook)
        reconciler = self.service.reconciler
        assert reconciler is not None
        for emu in self.emus:
            emu.set_latency(0.02)
        self.model.note("every server slow (20 ms); a full reconcile starts")
        self.act(self.random_emu(), "before a reconcile")
        self.background.append(asyncio.create_task(reconciler.reconcile(), name="test-reconcile"))
        await self.next_requests(10)

    async def s_compare(self) -> None:
        """A user acts on a server while jfsync's compare-before-write read of it is answered.

        The answer (built before the action) is held in the server's proxy until jfsync has
        applied the live event of the action (or 1 s passed), then delivered: the read that
        was requested first is applied last.
        """
        target = self.random_emu()
        gate = self.cluster.gates[target.server_name]
        acted: list[tuple[str, str]] = []

        def hook(emu: Emulator, record: RequestRecord) -> bool:
            if emu is not target or record.method != "GET" or not _has(record, "ids"):
                return False
            uid = _query(record, "userid")
            ids = [i for i in _query(record, "ids").split(",") if i in self.items]
            if uid not in emu.users or not ids:
                return False
            user, item = emu.users[uid].name, self.rng.choice(ids)
            gate.hold_http()
            self.model.note(f"compare read of {target.server_name} answered and held; user acts")
            self.act(target, "during a compare read", user, item)
            acted.append((user, item))
            return True

        self.hooks.append(hook)
        try:
            self.act(self.random_emu(target), "before a compare")
            await self.next_requests(10)
            if acted:
                user, item = acted[0]
                ledger = self.service.ledger
                now = self.cluster.data(target, item, user)

                async def applied() -> bool:
                    known = await ledger.last_known(target.server_name, f"name:{user}", item)
                    return known == now

                try:
                    await self.service.wait_for(applied, 1.0)
                except TimeoutError:
                    self.model.note("(the live event was not applied within 1 s)")
        finally:
            self.hooks.clear()
            gate.release_http()

    async def s_peer_down(self) -> None:
        """A server is down while users act there and elsewhere."""
        target = self.random_emu()
        self.model.note(f"{target.server_name} stops listening")
        await target.stop_listener()
        await self.some_actions(
            f"while {target.server_name} is down", self.rng.randint(1, 4), self.emus
        )
        await self.clock.advance(self.rng.choice([0.0, 0.1, 0.5]))
        self.model.note(f"{target.server_name} listens again")
        await target.start_listener()

    async def s_sockets(self) -> None:
        """A server drops or half-opens its sockets while users act."""
        target = self.random_emu()
        if self.rng.random() < 0.5:
            self.model.note(f"{target.server_name} drops its sockets")
            await target.drop_sockets()
        else:
            self.model.note(f"{target.server_name} half-opens its sockets")
            target.half_open_sockets()
        await self.some_actions(
            f"{target.server_name} sockets cut", self.rng.randint(1, 4), self.emus
        )

    async def s_crash(self) -> None:
        """jfsync stops with no grace at one of its requests; users act while it is down."""
        at = self.rng.randint(1, 10)
        seen: list[int] = []
        reached = asyncio.Event()

        def hook(emu: Emulator, record: RequestRecord) -> bool:
            seen.append(1)
            if len(seen) >= at:
                reached.set()
                return True
            return False

        self.hooks.append(hook)
        await self.some_actions("before a crash", self.rng.randint(1, 3), self.emus)
        try:
            async with asyncio.timeout(IDLE_S):
                await reached.wait()
        except TimeoutError:
            pass
        self.model.note(f"jfsync stops with no grace (at its request #{len(seen)})")
        self.hooks.clear()
        await self.stop_service(0.0)
        self.crashes += 1
        await self.some_actions("while jfsync is down", self.rng.randint(0, 2), self.emus)
        self.model.note("a new jfsync starts on the same ledger")
        await self.start_service()

    def wipe_target(self) -> tuple[Emulator, list[str]] | None:
        """A server and users whose data a wipe can be told from user resets (or None)."""
        leaves = [i.id for i in self.emus[0].leaf_items()]
        options = []
        for emu in self.emus:
            users = [
                u
                for u in USERS
                if sum(not self.cluster.data(emu, i, u).is_default for i in leaves)
                >= RESET_GUARD_MIN_ITEMS
            ]
            if users:
                options.append((emu, users))
        if not options:
            return None
        emu, users = self.rng.choice(options)
        return emu, (users if self.rng.random() < 0.5 else [self.rng.choice(users)])

    async def s_wipe(self) -> None:
        """A server comes back with user data gone: restored from the others, not spread."""
        found = self.wipe_target()
        assert found is not None
        target, users = found
        self.model.note(f"{target.server_name} stops, loses the data of {users}, comes back")
        link = self.service.links[target.server_name]
        sessions_before = {s.user_name: s.status.reconnect_count for s in link.subscribers.values()}
        await target.stop_listener()
        everyone = set(users) == set(target.users[u].name for u in target.users)
        target.wipe_user_data(None if everyone else target.user_id(users[0]))
        if not everyone:
            users = [users[0]]
        self.model.wiped(target.server_name, users)
        self.wipes[target.server_name] += 1
        others = [e for e in self.emus if e is not target]
        await self.some_actions(
            f"while {target.server_name} is down", self.rng.randint(0, 2), others
        )
        await target.start_listener()

        def caught_up() -> bool:
            # A new session (so its catch-up ran) on every socket of the wiped server: its
            # sockets may not have noticed the stop yet when the listener is back.
            return self.connected() and all(
                s.status.reconnect_count > sessions_before.get(s.user_name, 0)
                for s in link.subscribers.values()
            )

        # No action on the wiped server before jfsync's catch-up of it ran.
        await self.drive(caught_up, f"{target.server_name} caught up after the wipe")

    # ------------------------------------------------------------------ write counts

    def write_counts(self) -> list[str]:
        """Check jfsync's writes per (server, user, item) against what the actions required.

        A server needs a write for a (user, item) only when an action elsewhere changed it,
        or when it lost its data (a restore), or after a crash cut a write off; each write is
        at most three requests. Returns the problems; the counts go to the log.
        """
        problems = []
        table = []
        for emu in self.emus:
            counts: Counter[tuple[str, str]] = Counter()
            for write in emu.writes:
                if write.client == "jfsync" and write.status < 300 and write.item_id in self.items:
                    assert write.user_id is not None
                    assert write.item_id is not None
                    counts[(emu.users[write.user_id].name, write.item_id)] += 1
            for user in USERS:
                for item in self.items:
                    elsewhere = sum(
                        1 for a in self.model.actions_on(user, item) if a.server != emu.server_name
                    )
                    allowed = (
                        REQUESTS_PER_WRITE
                        * (elsewhere + self.wipes[emu.server_name] + self.crashes)
                        + WRITE_SLACK
                    )
                    got = counts[(user, item)]
                    table.append(f"{emu.server_name} {user} {item[:6]}: {got}/{allowed}")
                    if got > allowed:
                        problems.append(
                            f"{emu.server_name} {user} {item[:6]}: {got} write requests, "
                            f"at most {allowed} explained ({elsewhere} actions elsewhere)"
                        )
        self.model.log.append("writes (got/allowed): " + "; ".join(table))
        return problems


def situations() -> list[str]:
    """The situations to draw from: all, less those named in ``JFSYNC_MODEL_SKIP``.

    ``JFSYNC_MODEL_SKIP=after-write,wipe`` leaves out situations whose loss is known, so the
    others can be checked on their own (each fix proven separately).
    """
    skip = {s.strip() for s in os.environ.get("JFSYNC_MODEL_SKIP", "").split(",") if s.strip()}
    unknown = skip - set(SITUATIONS)
    if unknown:
        raise ValueError(
            f"JFSYNC_MODEL_SKIP names unknown situations {sorted(unknown)}; "
            f"known: {sorted(set(SITUATIONS))}"
        )
    chosen = [s for s in SITUATIONS if s not in skip]
    return chosen or ["plain"]


def _query(record: RequestRecord, parameter: str) -> str:
    """The first value of a query parameter (any case), or ''."""
    return next((v[0] for k, v in record.query.items() if k.lower() == parameter and v), "")


def _has(record: RequestRecord, parameter: str) -> bool:
    return any(key.lower() == parameter for key in record.query)


async def run_schedule(make_cluster: MakeCluster, schedule: Schedule) -> Run:
    """Run one schedule; fail with the readable report on the first wrong register."""
    clock = ManualClock()
    names = tuple("abc"[: schedule.servers])
    # The oracle is design.md's invariant: every server ends as ONE server would have, the
    # user's last action winning. Rewatch protection (sync.rewatch_protection, on by default)
    # deliberately departs from it: a playback that un-plays a played item is kept from the
    # other servers while the rewatch is under way, and a "playback stopped" action here is
    # exactly such an un-play. It is off for these schedules; tests/replication/test_rewatch.py
    # checks it as the user sees it.
    cluster = await make_cluster(
        schedule.servers,
        clock=clock,
        leaves=schedule.items + 6,
        gated=names,
        sync={"rewatch_protection": False},
    )
    items = cluster.free_items[: schedule.items]
    model = Model([e.server_name for e in cluster.emus])
    run = Run(cluster, clock, random.Random(schedule.seed), schedule, model, items)
    emulator_module.request_observers.append(run.observe)
    try:
        # The fixture's service, restarted with short keepalives (half-open sockets).
        await run.stop_service(2.0)
        await run.start_service()
        await run.barrier()
        for _ in range(schedule.rounds):
            await run.round()
        problems = run.write_counts()
        if problems:
            pytest.fail(run.report(problems), pytrace=False)
    finally:
        emulator_module.request_observers.remove(run.observe)
        for task in run.background:
            task.cancel()
        await asyncio.gather(*run.background, return_exceptions=True)
    return run


def _seeds(default: list[int]) -> list[int]:
    chosen = os.environ.get("JFSYNC_MODEL_SEED")
    return [int(chosen)] if chosen else default


def _summary(run: Run) -> str:
    """The schedule and its totals (shown with ``-s`` or on failure)."""
    return (
        "\n".join(run.model.log[:-1])
        + "\n"
        + (
            f"seed {run.schedule.seed}: {len(run.model.actions)} actions in "
            f"{run.schedule.rounds} rounds on {run.schedule.servers} servers; situations "
            f"{dict(run.situations)}; {run.model.log[-1]}"
        )
    )


@pytest.mark.parametrize("seed", _seeds([1, 2, 3, 4]))
@pytest.mark.parametrize("servers", [2, 3])
async def test_model_fast_slice_loses_nothing(
    make_cluster: MakeCluster, servers: int, seed: int
) -> None:
    run = await run_schedule(make_cluster, Schedule(seed, servers, rounds=5, items=4))
    print(_summary(run))


@pytest.mark.slow
@pytest.mark.parametrize(
    "seed", _seeds(list(range(100, 100 + int(os.environ.get("JFSYNC_MODEL_SOAK_SEEDS", "12")))))
)
async def test_model_soak_loses_nothing(make_cluster: MakeCluster, seed: int) -> None:
    servers = 2 + seed % 2
    run = await run_schedule(make_cluster, Schedule(seed, servers, 20, 6, test="soak"))
    print(_summary(run))
