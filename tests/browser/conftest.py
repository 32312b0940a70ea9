"""Fixtures for the browser tests: the operate stack (emulators, jfsync, status server) and a
headless Chromium. Without a Chromium binary the tests are skipped, saying so, unless
``JFSYNC_REQUIRE_BROWSER=1`` (CI, after ``.ci/browser`` installed it): then they fail."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from tests.browser.chromium import Browser, find_chromium
from tests.operate.conftest import emulators, make_stack  # noqa: F401 - fixtures used here

CHROMIUM = find_chromium()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip (or, when a browser is required, fail) the browser tests without Chromium."""
    if CHROMIUM is not None:
        return
    if os.environ.get("JFSYNC_REQUIRE_BROWSER") == "1":
        return  # the browser fixture fails them with the reason
    skip = pytest.mark.skip(
        reason="no chromium binary found (apt-get install chromium, or set JFSYNC_CHROMIUM)"
    )
    for item in items:
        if "tests/browser/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium with one page; closed at teardown."""
    if CHROMIUM is None:
        pytest.fail("JFSYNC_REQUIRE_BROWSER=1 but no chromium binary was found")
    async with Browser(CHROMIUM) as opened:
        yield opened
    assert opened.page_errors == [], f"the page threw: {opened.page_errors}"
