"""Crash safety and graceful shutdown of ``jfsync run`` as a real subprocess.

Three emulators run in the test process; ``python -m jfsync run --config FILE`` runs beside
them. Each repetition makes a burst of user changes (each next change after jfsync's next
request, so changes and replication interleave), kills jfsync with SIGKILL at a random
request of the burst (seeded), makes more changes while it is dead, restarts it on the same
ledger and waits until every server holds what the users did. Each (item, register) is
changed on one server per repetition, so the expected end state is known exactly: nothing
may be lost and nothing may come back. After the last run the ledger's invariants are
checked on the file.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jfsync import emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord
from jfsync.model import PlayState, Register, UserData, s_to_datetime
from jfsync.sync.ledger import Ledger
from jfsync.sync.merge import MergePolicy
from tests.replication.harness import USER, new_emulator
from tests.support.config import free_port, write_config
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
#: Real-time bound for a restart to converge (process start, catch-up, writes).
CONVERGE_S = 30.0
#: Items the bursts play with; few, so repetitions hit the same items again.
ITEMS = 8
#: Changes per burst, and while jfsync is dead.
BURST = 10
WHILE_DEAD = 3


def write_jfsync_config(path: Path, emus: list[Emulator], grace_s: float = 5.0) -> None:
    """Write a ``jfsync run`` config syncing ``emus`` with a ledger beside it."""
    write_config(
        path,
        emus,
        ledger=path.parent / "ledger.db",
        timeout_s=5,
        logging={"level": "info"},
        status={"listen": f"127.0.0.1:{free_port()}"},
        sync={"shutdown_grace": grace_s},
    )


class Requests:
    """Counts jfsync's requests to the emulators and wakes waiters on each one."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()
        self.on_request: list[object] = []

    def observe(self, emu: Emulator, record: RequestRecord) -> None:
        """Request observer (called synchronously by every emulator)."""
        if record.client == "jfsync":
            self.count += 1
            for hook in list(self.on_request):
                assert callable(hook)
                hook()
        self.changed.set()

    async def wait(self, predicate: object, timeout_s: float) -> None:
        """Wait until ``predicate()`` holds, re-checking after every request."""
        assert callable(predicate)
        await wait_until(predicate, timeout_s, changed=self.changed)


@dataclass
class World:
    """The emulators, the expected state and the running jfsync process."""

    emus: list[Emulator]
    config: Path
    requests: Requests
    rng: random.Random
    expected: dict[str, UserData] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    counter: int = 0

    @property
    def items(self) -> list[str]:
        """The items the bursts change."""
        return [i.id for i in self.emus[0].leaf_items()][:ITEMS]

    def holds(self, emu: Emulator, item: str) -> UserData:
        """What ``emu`` holds for the user and item."""
        return emu.user_data(emu.user_id(USER), item)

    def converged(self) -> bool:
        """Every server holds the expected state of every item."""
        return all(
            self.holds(e, i) == self.expected.get(i, UserData())
            for e in self.emus
            for i in self.items
        )

    def describe(self) -> str:
        """What differs from the expected state, for failure messages."""
        lines = []
        for item in self.items:
            want = self.expected.get(item, UserData())
            for emu in self.emus:
                got = self.holds(emu, item)
                if got != want:
                    lines.append(f"{emu.server_name} {item[:8]}: {got} != {want}")
        return "\n".join(lines)

    async def start(self) -> None:
        """Start ``jfsync run`` on the config (the ledger persists between runs)."""
        assert self.proc is None or self.proc.returncode is not None
        self.log_path = self.config.parent / "jfsync.log"
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "jfsync",
                "run",
                "--config",
                str(self.config),
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.reaper = asyncio.create_task(self._reap(self.proc), name="test-jfsync-reaper")

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        """Wake request waiters when the process exits (no request will come then)."""
        await proc.wait()
        self.requests.changed.set()

    def kill(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the running process, if it still runs."""
        if self.proc is not None and self.proc.returncode is None:
            self.signals.append(f"{sig.name} at request {self.requests.count}")
            self.proc.send_signal(sig)

    def log_tail(self) -> str:
        """The end of jfsync's log (all runs), for failure messages."""
        log = self.log_path.read_text() if self.log_path else ""
        return f"--- jfsync log:\n{log[-4000:]}"

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its status."""
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout_s):
                return await self.proc.wait()
        except TimeoutError:
            pytest.fail(
                f"jfsync still runs {timeout_s} s after {self.signals[-1:]}\n{self.log_tail()}"
            )

    def change(self) -> None:
        """Make one user change on the owner server of a random (item, register).

        Every change gives its register a value it did not have (rating and play state take
        ever new values, a favourite flips at most once per item and repetition), so no
        user change can look like the state before one of jfsync's writes (which the echo
        rule would take for a stale event; see :mod:`jfsync.sync.echo`).
        """
        item = self.rng.choice(self.items)
        register = self.rng.choice(list(Register))
        if register is Register.FAVORITE and item in self.flipped:
            register = Register.RATING
        owner = self.owners[(item, register)]
        self.counter += 1
        n = self.counter
        current = self.expected.get(item, UserData())
        uid = owner.user_id(USER)
        if register is Register.FAVORITE:
            self.flipped.add(item)
            value: object = not current.favorite
            owner.save_user_data(uid, item, is_favorite=not current.favorite)
        elif register is Register.RATING:
            # Every 7th change clears it (when set); the others take a value never used before
            # (hundredths; the counter stays far below 1,000 changes per run).
            value = None if n % 7 == 0 and current.rating is not None else (n % 1000) / 100
            if value is None:
                owner.save_user_data(uid, item, clear_rating=True)
            else:
                owner.save_user_data(uid, item, rating=value)
        else:
            played = n % 3 != 0
            value = PlayState(
                played=played,
                play_count=n,
                last_played_s=1_700_000_000 + n if played else None,
                position_ticks=0 if played else n * 10_000_000,
            )
            assert isinstance(value, PlayState)
            owner.save_user_data(
                uid,
                item,
                played=value.played,
                play_count=value.play_count,
                last_played=s_to_datetime(value.last_played_s),
                clear_last_played=value.last_played_s is None,
                position_ticks=value.position_ticks,
            )
        assert value is None or isinstance(value, bool | float | PlayState)
        self.expected[item] = current.with_register(register, value)

    def new_owners(self) -> None:
        """Give every (item, register) one server to change it on for this repetition."""
        self.flipped = set()
        self.owners = {
            (item, register): self.rng.choice(self.emus)
            for item in self.items
            for register in Register
        }

    owners: dict[tuple[str, Register], Emulator] = field(default_factory=dict)
    flipped: set[str] = field(default_factory=set)
    sentinel_round: int = 0
    signals: list[str] = field(default_factory=list)
    reaper: asyncio.Task[None] | None = None


@asynccontextmanager
async def world(tmp_path: Path, seed: int) -> AsyncIterator[World]:
    """Three emulators, a config, a request counter; jfsync is killed and reaped at the end."""
    emus = [new_emulator(name, leaves=ITEMS + 4) for name in "abc"]
    for emu in emus:
        await emu.start()
    requests = Requests()
    emulator_module.request_observers.append(requests.observe)
    config = tmp_path / "jfsync.yaml"
    write_jfsync_config(config, emus)
    state = World(emus, config, requests, random.Random(seed))
    try:
        yield state
    finally:
        if state.proc is not None and state.proc.returncode is None:
            state.proc.kill()
            await state.proc.wait()
        if state.reaper is not None:
            await state.reaper
        emulator_module.request_observers.remove(requests.observe)
        for emu in emus:
            await emu.close()


async def burst(state: World, changes: int) -> None:
    """Make ``changes`` changes, each after jfsync's next request (or at once once it is dead)."""
    for _ in range(changes):
        state.change()
        seen = state.requests.count
        proc = state.proc
        assert proc is not None
        try:
            await state.requests.wait(
                lambda seen=seen, proc=proc: (
                    state.requests.count > seen or proc.returncode is not None
                ),
                CONVERGE_S,
            )
        except TimeoutError:
            pytest.fail(
                f"jfsync wrote nothing after change #{state.counter} "
                f"(signals sent: {state.signals}):\n{state.describe()}\n{state.log_tail()}"
            )


async def converge(state: World) -> None:
    """Wait until every server holds the expected state (jfsync running)."""
    try:
        await state.requests.wait(state.converged, CONVERGE_S)
    except TimeoutError:
        pytest.fail(f"not converged:\n{state.describe()}\n{state.log_tail()}")


async def barrier(state: World) -> None:
    """Wait until jfsync applied everything every server sent so far (jfsync running).

    One sentinel change per server, on items the bursts never touch: a server's messages
    are applied in order, so once its sentinel reached every other server, every echo it
    sent before (of jfsync's last writes) has been applied too. The next burst then never
    meets a write whose echo is still expected.
    """
    state.sentinel_round += 1
    sentinels = [i.id for i in state.emus[0].leaf_items()][ITEMS : ITEMS + len(state.emus)]
    # A resume position: visible to a catch-up scan too (IsResumable), should jfsync be
    # just starting.
    want = PlayState(position_ticks=state.sentinel_round * 10_000_000)
    for emu, item in zip(state.emus, sentinels, strict=True):
        emu.save_user_data(emu.user_id(USER), item, position_ticks=want.position_ticks)

    def through() -> bool:
        return all(state.holds(e, i).play_state == want for e in state.emus for i in sentinels)

    await state.requests.wait(through, CONVERGE_S)


async def check_ledger(state: World) -> None:
    """Open the ledger file (jfsync stopped) and check its invariants."""
    names = tuple(e.server_name for e in state.emus)
    async with Ledger(state.config.parent / "ledger.db", MergePolicy(servers=names)) as ledger:
        assert await ledger.check_invariants() == []


def kill_points(rng: random.Random, repetitions: int) -> Iterator[int]:
    """The request (counted from the start of each burst) at which jfsync is killed."""
    for _ in range(repetitions):
        yield rng.randint(1, 3 * BURST)


async def crash_and_restart(tmp_path: Path, repetitions: int, seed: int) -> None:
    """The crash scenario: see the module docstring."""
    async with world(tmp_path, seed) as state:
        await state.start()
        for rep, kill_at in enumerate(kill_points(random.Random(seed + 1), repetitions)):
            await barrier(state)
            state.new_owners()
            start = state.requests.count

            def maybe_kill(start: int = start, kill_at: int = kill_at) -> None:
                if state.requests.count - start >= kill_at:
                    state.kill(signal.SIGKILL)

            state.requests.on_request.append(maybe_kill)
            try:
                await burst(state, BURST)
            finally:
                state.requests.on_request.remove(maybe_kill)
            state.kill(signal.SIGKILL)  # the burst ended before the chosen request: now
            # 255: asyncio's child watcher could not read the status ("Unknown child
            # process"); the process is gone either way.
            assert await state.wait_exit(10) in (-signal.SIGKILL, 255)
            for _ in range(WHILE_DEAD):
                state.change()
            await state.start()
            await converge(state)
            assert state.converged(), f"repetition {rep}"
        state.kill(signal.SIGTERM)
        assert await state.wait_exit(15) == 0
        await check_ledger(state)


@pytest.mark.timeout(120)
async def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    await crash_and_restart(tmp_path, repetitions=10, seed=11)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_sigkill_soak(tmp_path: Path) -> None:
    await crash_and_restart(tmp_path, repetitions=50, seed=23)


@pytest.mark.timeout(90)
async def test_sigterm_exits_0_within_the_grace_period_and_loses_nothing(tmp_path: Path) -> None:
    grace_s = 5.0
    async with world(tmp_path, seed=5) as state:
        write_jfsync_config(state.config, state.emus, grace_s=grace_s)
        await state.start()
        for rep in range(3):
            await barrier(state)
            state.new_owners()
            start = state.requests.count
            stop_at = 2 + rep * 3

            def maybe_stop(start: int = start, stop_at: int = stop_at) -> None:
                if state.requests.count - start == stop_at:
                    state.kill(signal.SIGTERM)

            state.requests.on_request.append(maybe_stop)
            try:
                await burst(state, BURST)
            finally:
                state.requests.on_request.remove(maybe_stop)
            state.kill(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            asked = loop.time()
            assert await state.wait_exit(grace_s + 5) == 0, state.log_tail()
            assert loop.time() - asked < grace_s + 3, state.log_tail()
            await check_ledger(state)
            await state.start()
            await converge(state)
        state.kill(signal.SIGTERM)
        assert await state.wait_exit(grace_s + 5) == 0, state.log_tail()
        assert state.log_path is not None
        assert "Traceback" not in state.log_path.read_text()
