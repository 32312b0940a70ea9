"""``jfsync run`` never hangs at exit: a failing stop step is logged, a stuck stop is cut short.

A container manager (docker, systemd) that sends SIGTERM expects the process to end; one
that hangs instead gets killed later and says nothing about why. These tests run
:func:`run_service` in the test's loop against two emulators over loopback, with a manual
clock for the shutdown deadline and a recording ``force_exit`` in place of ``os._exit``; the
signals are real (SIGTERM to this process, caught by the loop's handler).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path

import pytest

from jfsync.config import Config
from jfsync.emulator import Emulator
from jfsync.ops.runcmd import SHUTDOWN_SLACK_S, run_service
from jfsync.service import SyncService
from jfsync.timing import ManualClock
from tests.operate.conftest import KEYS, free_port
from tests.support.cluster import service_connected
from tests.support.config import make_config
from tests.support.waiting import WAIT_S

pytestmark = pytest.mark.timeout(30)
GRACE_S = 2.0


def _config(tmp_path: Path, emus: dict[str, Emulator]) -> Config:
    return make_config(
        emus,
        api_key=KEYS,
        ledger=tmp_path / "ledger.db",
        status={"listen": f"127.0.0.1:{free_port()}"},
        sync={"shutdown_grace": GRACE_S},
    )


class StuckService(SyncService):
    """A service whose stop closes everything for real, then waits on something forever."""

    def __init__(self, config: Config, clock: ManualClock) -> None:
        super().__init__(config, clock=clock)
        self.stuck = asyncio.Event()
        self.never = asyncio.Event()

    async def stop(self) -> None:
        await super().stop()
        self.stuck.set()
        await self.never.wait()


async def test_a_stop_that_never_ends_is_cut_short_after_grace_plus_slack(
    emulators: dict[str, Emulator], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    service = StuckService(_config(tmp_path, emulators), clock)
    exits: list[int] = []
    caplog.set_level(logging.INFO, logger="jfsync")
    run = asyncio.create_task(
        run_service(service.config, service=service, force_exit=exits.append, backstop=False)
    )
    await service_connected(service)

    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(WAIT_S):
        await service.stuck.wait()
    os.kill(os.getpid(), signal.SIGTERM)  # a supervisor asking again: still the graceful stop
    await asyncio.sleep(0)
    assert exits == []  # still inside the allowance: no forced exit yet
    await clock.advance(GRACE_S + SHUTDOWN_SLACK_S - 0.5)
    assert not run.done()
    assert exits == []
    await clock.advance(1.0)
    async with asyncio.timeout(WAIT_S):
        code = await run

    assert code == 1
    assert exits == [1]
    said = caplog.text
    assert f"did not end within {GRACE_S + SHUTDOWN_SLACK_S:.0f} s" in said
    # Whoever reads the log learns where it hung.
    assert "still waiting on: " in said
    assert "jfsync-stop: _shut_down > stop > wait at " in said  # StuckService.stop


async def test_a_second_interrupt_exits_at_once(
    emulators: dict[str, Emulator], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    service = StuckService(_config(tmp_path, emulators), clock)
    exits: list[int] = []
    forced = asyncio.Event()

    def force_exit(code: int) -> None:
        exits.append(code)
        forced.set()

    run = asyncio.create_task(
        run_service(service.config, service=service, force_exit=force_exit, backstop=False)
    )
    await service_connected(service)

    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(WAIT_S):
        await service.stuck.wait()
    os.kill(os.getpid(), signal.SIGINT)
    async with asyncio.timeout(WAIT_S):
        await forced.wait()
    assert exits == [1]
    assert "second interrupt: exiting at once" in caplog.text
    # (force_exit returned, as only a test's does: let the deadline end the run.)
    await clock.advance(GRACE_S + SHUTDOWN_SLACK_S)
    async with asyncio.timeout(WAIT_S):
        assert await run == 1


async def test_a_failing_stop_step_still_closes_the_ledger_and_the_index(
    emulators: dict[str, Emulator],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="jfsync")
    service = SyncService(_config(tmp_path, emulators))
    await service.start()
    try:
        await service_connected(service)
        pusher = service.links["home"].pusher
        real_stop = pusher.stop

        async def broken_stop(grace_s: float) -> None:
            await real_stop(grace_s)
            raise RuntimeError("a pusher that cannot stop")

        monkeypatch.setattr(pusher, "stop", broken_stop)
    finally:
        await service.stop()

    assert "stopping the pushers failed; going on with the shutdown" in caplog.text
    assert "a pusher that cannot stop" in caplog.text
    assert "jfsync stopped" in caplog.text
    # The index and the ledger were still closed: no SQLite worker thread is left running
    # (the suite's conftest fails a test that leaves one).
    workers = [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]
    for worker in workers:
        worker.join(2.0)  # a closed connection's worker ends just after close() returns
    assert not [t for t in workers if t.is_alive()]
