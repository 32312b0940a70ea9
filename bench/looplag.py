"""Event-loop lag probe and per-process disk-write counter for the benchmarks (issue 13).

:class:`LoopLag` is a task that sleeps 5 ms in a loop and records how late each wake-up came:
the worst overshoot is the longest time the event loop was stalled by synchronous work (a
stall of 250 ms means every event, write and answer waited that long). Each overshoot of at
least 1 ms can also be appended to a file as ``<time.monotonic()> <ms>`` lines, so a bench in
another process can take the worst stall within each of its phases (CLOCK_MONOTONIC is one
clock for all processes on Linux).

Run as a script it wraps a Python module with the probe on its event loop, for ``jfsync run``
in a subprocess without touching jfsync::

    python bench/looplag.py --out stalls.txt -m jfsync run --config jfsync.yaml

With ``LOOPLAG_SLOW_CALLBACKS=FILE`` in its environment it also writes each callback of the
loop that ran ``LOOPLAG_SLOW_MS`` (default 2) or longer to FILE, with the task and where it
stopped (:func:`trace_slow_callbacks`): what each stall was.

:func:`write_bytes` reads the bytes this process caused to be written to storage
(``write_bytes`` in ``/proc/self/io``; SQLite's worker thread is counted with the process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import runpy
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

#: The probe's sleep between wake-ups.
INTERVAL_S = 0.005
#: Overshoots at least this long are written to the stall file.
RECORD_MS = 1.0


def write_bytes() -> int:
    """Bytes this process has caused to be written to storage so far (0 if not on Linux)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "write_bytes":
            return int(value)
    return 0


class LoopLag:
    """A task on the running loop recording the worst lateness of a 5 ms sleep."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.worst_ms = 0.0
        self.over_50ms = 0
        self.wakeups = 0
        self._out = out
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LoopLag:
        """Start probing on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._probe(), name="looplag")
        return self

    def reset(self) -> None:
        """Forget the worst stall so far (a new phase begins)."""
        self.worst_ms = 0.0
        self.over_50ms = 0
        self.wakeups = 0

    async def stop(self) -> float:
        """Stop probing; return the worst stall in milliseconds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        return self.worst_ms

    async def __aenter__(self) -> LoopLag:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _probe(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(INTERVAL_S)
            now = time.monotonic()
            late_ms = (now - before - INTERVAL_S) * 1000
            self.wakeups += 1
            if late_ms > self.worst_ms:
                self.worst_ms = late_ms
            if late_ms > 50:
                self.over_50ms += 1
            if self._out is not None and late_ms >= RECORD_MS:
                self._out.write(f"{now:.6f} {late_ms:.2f}\n")
                self._out.flush()


def worst_between(path: Path, start: float, end: float) -> float:
    """The worst stall (ms) recorded in ``path`` that ended within [start, end] (monotonic)."""
    worst = 0.0
    with contextlib.suppress(FileNotFoundError), path.open() as lines:
        for line in lines:
            when, _, ms = line.partition(" ")
            try:
                at, late = float(when), float(ms)
            except ValueError:
                continue  # a line cut short by the process exiting mid-write
            if start <= at <= end:
                worst = max(worst, late)
    return worst


def trace_slow_callbacks(out: TextIO, threshold_ms: float) -> Callable[[], None]:
    """Append every event-loop callback that runs ``threshold_ms`` or longer to ``out``:
    ``<time.monotonic()> <ms> cpu <ms of the thread's CPU> <what ran>`` (a task's name and
    coroutine, and where it stopped next: the frames it is suspended in after that step).
    Returns a function that stops it.

    This attributes the stalls :class:`LoopLag` measures: which one stretch of synchronous
    work, in which task, held the loop (a catch-up's page, a status build, a bulk apply).
    """
    real_run = asyncio.events.Handle._run
    limit_s = threshold_ms / 1000

    def timed_run(handle: asyncio.events.Handle) -> None:
        began, cpu = time.perf_counter(), time.thread_time()
        real_run(handle)
        took = time.perf_counter() - began
        if took >= limit_s:
            # CPU time too: on a shared machine a step may be long only for being preempted.
            used = (time.thread_time() - cpu) * 1000
            out.write(
                f"{time.monotonic():.6f} {took * 1000:.2f} cpu {used:.2f} {_describe(handle)}\n"
            )
            out.flush()

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
    started: list[float] = [0.0]

    def collected(phase: str, info: dict[str, int]) -> None:
        # The collector holds the GIL, and the loop with it: its passes are stalls too.
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took >= limit_s:
            out.write(
                f"{time.monotonic():.6f} {took * 1000:.2f} cpu - gc generation "
                f"{info['generation']} ({info['collected']} collected)\n"
            )

    gc.callbacks.append(collected)

    def stop() -> None:
        asyncio.events.Handle._run = real_run  # type: ignore[method-assign]
        if collected in gc.callbacks:
            gc.callbacks.remove(collected)

    return stop


def _describe(handle: asyncio.events.Handle) -> str:
    """What a callback ran, on one line."""
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", repr(coro))
        return f"task {task.get_name()} {name} [next: {_awaiting(coro)}]"
    return repr(handle).replace("\n", " ")[:200]


def _awaiting(coro: object, depth: int = 4) -> str:
    """The innermost ``depth`` frames ``coro`` is suspended in (``name:line``, outer first)."""
    frames: list[str] = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        frame = frame or getattr(coro, "ag_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return " > ".join(frames[-depth:])


def _wrap_module(out_path: Path, module: str, argv: list[str]) -> int:
    """Run ``module`` as ``__main__`` with the probe started inside every ``asyncio.run``."""
    real_run = asyncio.run
    out = out_path.open("a", buffering=1)
    # Set by hand to attribute the stalls: LOOPLAG_SLOW_CALLBACKS=FILE (LOOPLAG_SLOW_MS, 2).
    slow_path = os.environ.get("LOOPLAG_SLOW_CALLBACKS")
    slow_out = Path(slow_path).open("a", buffering=1) if slow_path else None  # noqa: SIM115
    stop_tracing = (
        trace_slow_callbacks(slow_out, float(os.environ.get("LOOPLAG_SLOW_MS", "2")))
        if slow_out is not None
        else None
    )

    def probed_run(main: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        async def with_probe() -> Any:
            probe = LoopLag(out).start()
            try:
                return await main
            finally:
                await probe.stop()

        return real_run(with_probe(), **kwargs)

    asyncio.run = probed_run  # type: ignore[assignment]
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        asyncio.run = real_run
        out.close()
        if stop_tracing is not None:
            stop_tracing()
        if slow_out is not None:
            slow_out.close()
    return 0


def main() -> int:
    """Parse ``--out FILE -m MODULE ARGS...`` and run the module under the probe."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="stall file to append to")
    parser.add_argument("-m", dest="module", required=True, help="module to run as __main__")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    return _wrap_module(args.out, args.module, args.args)


if __name__ == "__main__":
    sys.exit(main())
