"""Suite-wide test hygiene: leftover tasks fail the test, and shared paths and fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

#: Every request jfsync sends to an emulator is checked against the official OpenAPI spec.
pytest_plugins = ["tests.support.openapi_requests"]

#: The shared reference folder (fact sheet and official OpenAPI files) beside the checkout.
REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


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


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The shared reference folder; the suite needs it for OpenAPI conformance."""
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"missing {REFERENCE_DIR}: the checkout needs ../shared beside it")
    return REFERENCE_DIR
