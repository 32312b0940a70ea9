"""Suite-wide test hygiene: leftover tasks and threads fail the test; shared paths and fixtures."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jfsync.logs import CHATTY_LIBRARIES
from tests.support.cluster import ClusterFactory, StartCluster
from tests.support.waiting import TIME_SCALE

#: Every request jfsync sends to an emulator is checked against the official OpenAPI spec.
pytest_plugins = ["tests.support.openapi_requests"]

#: The official OpenAPI files, kept in the repo (tests/data/openapi/README.md says where from).
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "openapi"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stretch every test's timeout by ``JFSYNC_TEST_TIME_SCALE`` (see tests/support/waiting.py).

    The test's own ``timeout`` mark (or its module's, or the ini default) times the scale goes
    first, so pytest-timeout sees it before any other.
    """
    if TIME_SCALE == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        mark = item.get_closest_marker("timeout")
        seconds = float(mark.args[0]) if mark is not None and mark.args else default
        if seconds > 0:
            item.add_marker(pytest.mark.timeout(seconds * TIME_SCALE), append=False)


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Fail any test that leaves asyncio tasks running after its fixtures are torn down."""
    before = set(asyncio.all_tasks())
    yield
    # Teardown runs in a task of its own; it and the tasks present before the test are fine.
    current = asyncio.current_task()
    leftover: list[asyncio.Task[object]] = []
    for _ in range(10):
        leftover = [
            t for t in asyncio.all_tasks() if t is not current and t not in before and not t.done()
        ]
        if not leftover:
            return
        await asyncio.sleep(0)
    for task in leftover:
        task.cancel()
    names = ", ".join(sorted(t.get_name() + ":" + repr(t.get_coro()) for t in leftover))
    pytest.fail(f"test left tasks running: {names}")


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """Undo what a test's ``configure_logging`` did (a config reload or ``run_service`` in the
    test's process calls it): the root logger's level and handlers and the noisy libraries'
    levels are put back, so a later test's ``configure_logging`` installs its own handler."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    chatty = {name: logging.getLogger(name).level for name in CHATTY_LIBRARIES}
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    for name, was in chatty.items():
        logging.getLogger(name).setLevel(was)


#: How long a test's threads (aiosqlite workers, executors) get to end after teardown.
THREAD_JOIN_S = 5.0


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Fail any test that leaves a thread running: an unclosed ledger or index, say.

    A non-daemon thread would also keep the interpreter alive after the last test, hanging
    CI; jfsync's SQLite workers are daemons (they must never hang the process) but one still
    running after a test means a connection it never closed.
    """
    before = set(threading.enumerate())
    yield
    leftover = [
        t for t in threading.enumerate() if t not in before and (_may_hang(t) or _sqlite_worker(t))
    ]
    for thread in leftover:
        thread.join(THREAD_JOIN_S)
    alive = [t.name for t in leftover if t.is_alive()]
    if alive:
        pytest.fail(f"test left threads running: {', '.join(alive)}")


def _sqlite_worker(thread: threading.Thread) -> bool:
    """Tell whether ``thread`` is an aiosqlite connection's worker (one per open connection)."""
    return thread.is_alive() and "_connection_worker_thread" in thread.name


def _may_hang(thread: threading.Thread) -> bool:
    """Tell whether ``thread`` could keep the interpreter alive at exit.

    Executor workers (asyncio's default executor, ThreadPoolExecutor) are shut down by
    concurrent.futures at exit and are not counted.
    """
    if thread is threading.main_thread() or thread.daemon or not thread.is_alive():
        return False
    return not thread.name.startswith(("asyncio_", "ThreadPoolExecutor"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Never hang at exit: if a leaked non-daemon thread survived, say so and exit now."""
    stuck = [t.name for t in threading.enumerate() if _may_hang(t)]
    if stuck:
        sys.stderr.write(f"\nthreads still running after the tests: {', '.join(stuck)}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(int(exitstatus) or 1)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of official OpenAPI files the suite checks conformance against."""
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"missing {REFERENCE_DIR}: the OpenAPI files are part of the repository")
    return REFERENCE_DIR


@pytest.fixture
async def start_cluster(tmp_path: Path) -> AsyncIterator[StartCluster]:
    """Start emulators and jfsync between them (:class:`tests.support.cluster.ClusterFactory`);
    every cluster, service and emulator started through it is stopped at teardown."""
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        await factory.close()
