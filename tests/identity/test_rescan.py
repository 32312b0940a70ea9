"""A library rescan never holds up live changes.

The index scan stores each page in its own short transaction and lets the event loop run
between pages. Here a full reconcile's rescan is held in the middle of a server's library
(between two pages) while a user changes an item on that same server: the change reaches the
other server before the rescan goes on.
"""

from __future__ import annotations

import asyncio

import pytest

from jfsync.model import UserData
from jfsync.service import SyncService
from jfsync.sync.identity import IndexedIdentity
from tests.identity.conftest import WAIT_S, MakeStack, emulator

pytestmark = pytest.mark.timeout(40)


async def test_events_flow_while_a_rescan_is_half_done(make_stack: MakeStack) -> None:
    paused = asyncio.Event()
    release = asyncio.Event()
    hold = False
    pages: list[int] = []

    async def on_page(server: str, items_so_far: int) -> None:
        if hold and server == "a":
            pages.append(items_so_far)
            paused.set()
            await release.wait()

    def identity(service: SyncService) -> IndexedIdentity:
        return IndexedIdentity(
            service.config, service.ledger, service.clock, page_size=5, on_page=on_page
        )

    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    await stack.start_service(identity=identity)
    service = stack.svc()
    assert service.reconciler is not None
    x_a, x_b = next((x.id, y.id) for x, y in stack.pairs("a", "b"))

    hold = True
    rescan = asyncio.create_task(service.reconciler.reconcile(), name="test-rescan")
    try:
        async with asyncio.timeout(WAIT_S):
            await paused.wait()
        assert pages == [5]  # held after the first page of a's 24 items
        stack.change("a", x_a, is_favorite=True)
        await stack.wait(lambda: stack.holds("b", x_b, UserData(favorite=True)))
        assert not rescan.done()
    finally:
        hold = False
        release.set()
        async with asyncio.timeout(WAIT_S):
            report = await rescan
    assert report.errors == []
    assert stack.pair_status("a", "b")["matched"] == 24
