"""``jfsync watch`` beside ``jfsync run``: watch has device ids of its own and takes nothing.

Jellyfin keeps one session per device (Client + DeviceId), delivers a user's events to one
socket of a session, and a new token for a device revokes the old one. With run's device ids,
starting ``watch`` would revoke the replicator's tokens and take its events; these tests run
both against two emulators (which route sessions the same way) over loopback.
"""

from __future__ import annotations

import io

import aiohttp
import pytest

from jfsync.ops.watch import Watcher
from jfsync.sync.tokens import user_device_id, watch_device_id, watch_rest_device_id
from jfsync.timing import SystemClock
from tests.operate.conftest import StackFactory
from tests.subscriber.test_watch import until_text

pytestmark = pytest.mark.timeout(40)

SERVER_ID = "5F0D4E3C-2B1A-4F9E-8D7C-6B5A4F3E2D1C"
USER_ID = "0123456789abcdef0123456789ABCDEF"


def test_watch_device_ids_differ_from_runs_and_are_stable() -> None:
    ids = watch_device_id(SERVER_ID, USER_ID)
    assert ids == watch_device_id(SERVER_ID.lower().replace("-", ""), USER_ID.lower())
    assert ids == "jfsync-watch-5f0d4e3c2b1a4f9e8d7c6b5a4f3e2d1c-0123456789abcdef0123456789abcdef"
    assert ids != user_device_id(SERVER_ID, USER_ID)
    assert watch_rest_device_id("home") == "jfsync-watch-rest-home"
    assert watch_rest_device_id("home") != "jfsync-rest-home"  # jfsync run's REST device


async def test_watch_beside_run_takes_none_of_runs_events(make_stack: StackFactory) -> None:
    stack = await make_stack()
    subscribers = [s for link in stack.service.links.values() for s in link.subscribers.values()]
    reconnects = [s.status.reconnect_count for s in subscribers]
    out, err = io.StringIO(), io.StringIO()
    watcher = Watcher(
        stack.service.config, ["home", "cabin"], out=out, err=err, clock=SystemClock()
    )
    async with aiohttp.ClientSession() as session:
        await watcher.start(session)
        try:
            await until_text(out, "state=connected", 4)  # alice and bob on both servers
            for emu in (stack.home, stack.cabin):
                devices = {s.device_id for s in emu.hub.sessions.values() if s.sockets}
                for user in ("alice", "bob"):
                    uid = emu.user_id(user)
                    assert user_device_id(emu.server_id, uid) in devices
                    assert watch_device_id(emu.server_id, uid) in devices

            # Alice favourites an item on home: jfsync run still hears it and copies it to
            # cabin, and watch prints it too.
            item = stack.items[1]
            expected = stack.change(stack.home, item, is_favorite=True)
            await stack.wait_for(lambda: stack.user_data(stack.cabin, item) == expected)
            assert stack.user_data(stack.home, item) == expected
            text = await until_text(out, f" {item} ", 2)  # home's event, cabin's echo
            assert any(ln.split()[1:4] == ["home", "alice", item] for ln in text.splitlines())
        finally:
            await watcher.stop()

    # Run's sockets never lost their session or token to watch.
    assert all(str(s.status.state) == "connected" for s in subscribers)
    assert [s.status.reconnect_count for s in subscribers] == reconnects
    assert "state=auth_failed" not in out.getvalue()
