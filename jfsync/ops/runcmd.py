"""``jfsync run``: the service in a process, with its status server, signals and config reload.

:func:`run_service` starts a :class:`jfsync.service.SyncService` and its status server, stops
both on SIGINT/SIGTERM (a second SIGINT ends at once), applies the config file again on SIGHUP
and when the file changes (:class:`jfsync.ops.reloader.ConfigReloader`), and bounds the
shutdown: past ``sync.shutdown_grace`` plus :data:`SHUTDOWN_SLACK_S` it names the tasks still
running and ends the process. :func:`tune_garbage_collector` is the process-wide GC setting
the service runs with.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import os
import signal
from collections.abc import Callable

from jfsync.config import Config
from jfsync.errors import JfsyncError
from jfsync.ops.reloader import POLL_S, ConfigReloader
from jfsync.ops.status import StatusServer
from jfsync.service import SyncService
from jfsync.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

#: Collector thresholds for ``jfsync run`` and ``jfsync reconcile`` (Python's defaults: 700,
#: 10, 10): young collections small and frequent, full ones rare (see below).
GC_THRESHOLDS = (2_000, 10, 5_000)


def tune_garbage_collector() -> None:
    """Make the cyclic garbage collector cheap for a long-running service (``jfsync run``).

    Almost everything jfsync allocates is freed by reference counting; the collector only
    matters for rare cycles. With Python's defaults it ran some 1,700 times during the
    10,000-write burst benchmark, the full collections walking the ledger's state cache
    and the library index each time (80-90 ms apiece, 0.8 s in all). Full collections are
    what must stay rare: one comes after 5,000 middle-generation ones, about as often as with
    the thresholds first chosen here (20,000, 50, 100). The young generations must stay small
    instead: every collection holds the GIL, and the event loop with it, for as long as it
    walks them, and those thresholds let the middle one grow to a million objects: 48 ms of
    CPU for one collection during the catch-ups of the latency benchmark, 70-80 ms in a
    reconcile of 2 x 50,000 items (160-240 ms of wall time at 200,000 on a loaded machine),
    and 6-11 ms for each young one. Now a young collection takes about half a millisecond
    and a middle one 5-11 ms; they run more often, so the collector's total work stays
    about the same (a 10,000-write burst used no more CPU). Objects that exist now (modules,
    classes, the config) live as long as the process and are moved out of the collector's
    sight first.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: How long past the grace period a shutdown may take before jfsync gives up on it.
SHUTDOWN_SLACK_S = 10.0


def _stuck_tasks() -> str:
    """Each other pending task with the chain of calls it waits in, for a stop that hung."""
    current = asyncio.current_task()
    lines = []
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task is current or task.done():
            continue
        lines.append(f"{task.get_name()}: {_awaiting(task.get_coro())}")
    return "; ".join(lines) or "none"


def _awaiting(coro: object) -> str:
    """``outer > ... > inner at file:line`` for a suspended coroutine chain."""
    names: list[str] = []
    where = "not started"
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        names.append(frame.f_code.co_name)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"{' > '.join(names) or '?'} at {where}"


async def run_service(
    config: Config,
    *,
    service: SyncService | None = None,
    force_exit: Callable[[int], object] = os._exit,
    backstop: bool = True,
    config_path: str | os.PathLike[str] | None = None,
    reload_poll_s: float | None = None,
) -> int:
    """Run until SIGINT or SIGTERM with the status endpoint; return the exit status.

    With ``config_path`` the file is watched and applied when it changes or on SIGHUP
    (:mod:`jfsync.reload`); an invalid edit keeps the running config.

    The first signal starts a graceful stop; a second SIGINT, or a stop still not finished
    ``SHUTDOWN_SLACK_S`` after the grace period, ends the process at once with status 1
    (``force_exit``), after logging what it was still waiting for. Nothing committed is lost
    that way: the ledger survives a kill, and queued rows are delivered by the next run.
    With ``backstop`` (not in tests: it would end the test process), a stop that has still
    not ended five seconds after that (the event loop itself blocked, or the interpreter's
    own teardown stuck) has every thread's stack written to stderr and the process ended.
    """
    service = service if service is not None else SyncService(config)
    status_server = StatusServer.from_config(service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloader = (
        ConfigReloader(service, os.fspath(config_path), poll_s=reload_poll_s or POLL_S)
        if config_path is not None
        else None
    )

    def on_signal(sig: signal.Signals) -> None:
        # Ctrl+C twice means "now"; a repeated SIGTERM (a supervisor's retry) just waits.
        if stop.is_set() and sig is signal.SIGINT:
            logger.warning("second interrupt: exiting at once; queued rows stay in the ledger")
            force_exit(1)
        stop.set()

    def on_hangup() -> None:
        if reloader is None:
            logger.warning("SIGHUP: no config file to read again (started without one)")
        else:
            logger.info("SIGHUP: reading the config file again")
            reloader.request()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        return await _serve(config, service, status_server, stop, force_exit, backstop, reloader)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _serve(
    config: Config,
    service: SyncService,
    status_server: StatusServer,
    stop: asyncio.Event,
    force_exit: Callable[[int], object],
    backstop: bool,
    reloader: ConfigReloader | None = None,
) -> int:
    """Start, wait for ``stop``, then shut down within the grace period plus the slack."""
    try:
        await service.start()
    except JfsyncError as err:
        logger.error("cannot start: %s", err)
        await service.stop()
        return 1
    try:
        await status_server.start()
    except OSError as err:
        # Syncing matters more than reporting: keep replicating without the endpoint.
        logger.error(
            "cannot serve the status endpoint on %s (%s); replicating without it; "
            "change status.listen",
            config.status.listen,
            err.strerror or err,
        )
    if reloader is not None:
        reloader.start()
    try:
        await service.wait_stop(stop)
    except asyncio.CancelledError:
        if reloader is not None:
            await reloader.stop()
        await _shut_down(service, status_server)
        raise
    if reloader is not None:
        await reloader.stop()  # no reload may re-create what the shutdown closes
    if service.fatal_error is None:
        logger.info("stop requested; finishing writes under way")
    limit_s = service.config.sync.shutdown_grace + SHUTDOWN_SLACK_S
    if backstop:
        # Armed for good: the process is on its way out, however that ends.
        faulthandler.dump_traceback_later(limit_s + 5.0, exit=True)
    stopping = asyncio.create_task(_shut_down(service, status_server), name="jfsync-stop")
    deadline = asyncio.create_task(service.clock.sleep(limit_s), name="jfsync-stop-deadline")
    await asyncio.wait({stopping, deadline}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        logger.error(
            "the shutdown did not end within %.0f s; exiting at once (queued rows stay in "
            "the ledger); still waiting on: %s",
            limit_s,
            _stuck_tasks(),
        )
        force_exit(1)
        # Only reached when force_exit returns (tests): end the stuck stop too.
        await cancel_and_wait([stopping, deadline], logger)
        return 1
    await cancel_and_wait([deadline], logger)
    await stopping
    if service.fatal_error is not None:
        logger.error("jfsync stopped: %s", service.fatal_error)
        return 1
    return 0


async def _shut_down(service: SyncService, status_server: StatusServer) -> None:
    """Stop the status endpoint, then the service."""
    # Status first: once the ledger closes it could only answer errors.
    await status_server.stop()
    await service.stop()
