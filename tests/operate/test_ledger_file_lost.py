"""A ledger file deleted or replaced under a running jfsync: unhealthy, stopped, nothing lost.

SQLite keeps writing into a file that was deleted or replaced under it, where nobody will ever
read it: rows queued for a down peer would vanish with it and the next start's first-contact
merge bring back favourites the user had removed. jfsync checks before every write that the
path still names the file it opened; these tests delete or replace the file under the service
(two emulators over loopback) and check what an operator sees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from jfsync.config import Config
from jfsync.emulator import Emulator
from jfsync.ops.runcmd import run_service
from jfsync.service import SyncService
from tests.core.test_ledger_file import committed
from tests.operate.conftest import KEYS, PUSHER, WAIT_S, StackFactory, free_port
from tests.support.cluster import fast_delays, service_connected
from tests.support.config import make_config

pytestmark = pytest.mark.timeout(40)


def _lose(path: Path, how: str, tmp_path: Path) -> bytes | None:
    """Delete the ledger file, or replace it by another SQLite file (whose bytes come back)."""
    if how == "deleted":
        path.unlink()
        return None
    other = tmp_path / "restored-from-elsewhere.db"
    db = sqlite3.connect(other)
    with db:
        db.execute("CREATE TABLE note (text TEXT)")
        db.execute("INSERT INTO note VALUES ('another file')")
    db.close()
    os.replace(other, path)
    return path.read_bytes()


def _at_path(path: Path) -> bytes | None:
    """The bytes of the file at ``path``, or None when there is none."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_change_after_the_ledger_file_is_lost_is_written_nowhere(
    make_stack: StackFactory, tmp_path: Path, how: str
) -> None:
    stack = await make_stack()
    item = stack.items[0]
    await stack.flow(stack.home, item, is_favorite=True)
    (key,) = (await stack.service.identity.canonical_items("home", [item])).values()
    await stack.cabin.stop_listener()  # cabin is down: a change for it would be queued
    path = Path(stack.service.config.ledger)
    wal = Path(f"{path}-wal")
    os.link(path, tmp_path / "orphan.db")  # keeps the file jfsync has open readable
    other = _lose(path, how, tmp_path)

    # The user removes the favourite on home: jfsync refuses to record it in a file nobody
    # sees, and says why.
    stack.change(stack.home, item, is_favorite=False)
    async with asyncio.timeout(WAIT_S):
        await stack.service.fatal.wait()
    status, body = await stack.get("/healthz")
    assert status == 503
    reason = json.loads(body)["reason"]
    assert f"the ledger file {path} was {how}" in reason
    assert stack.service.fatal_error == reason
    await stack.server.stop()
    await stack.service.stop()

    # Nothing was written after the loss: not into the file jfsync had open ...
    favourite = committed(
        tmp_path / "orphan.db",
        wal,
        "SELECT c.favorite FROM canonical c JOIN users u ON u.id = c.user "
        "JOIN items i ON i.id = c.item WHERE u.key = 'name:alice' AND i.key = ?",
        (key,),
    )
    assert favourite == [(1,)]
    queued = committed(
        tmp_path / "orphan.db",
        wal,
        "SELECT COUNT(*) FROM outbox o JOIN items i ON i.id = o.item WHERE i.key = ?",
        (key,),
    )
    assert queued == [(0,)]
    # ... nor into whatever is at the path now (nothing, when it was deleted).
    assert _at_path(path) == other
    # The user's change is still on home, where the next run finds it.
    assert stack.user_data(stack.home, item).favorite is False


def _config(tmp_path: Path, emus: dict[str, Emulator]) -> Config:
    return make_config(
        emus,
        api_key=KEYS,
        ledger=tmp_path / "ledger.db",
        status={"listen": f"127.0.0.1:{free_port()}"},
        sync={"shutdown_grace": 2},
    )


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_jfsync_run_goes_unhealthy_and_stops_with_the_error(
    emulators: dict[str, Emulator], tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="jfsync")
    config = _config(tmp_path, emulators)
    service = SyncService(config, subscriber_options={"delays": fast_delays}, pusher_options=PUSHER)
    exits: list[int] = []
    run = asyncio.create_task(
        run_service(config, service=service, force_exit=exits.append, backstop=False)
    )
    await service_connected(service)
    path = Path(config.ledger)
    other = _lose(path, how, tmp_path)

    url = f"http://{config.status.listen}/healthz"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 503
        reason = (await response.json())["reason"]
    assert f"the ledger file {path} was {how}" in reason

    async with asyncio.timeout(WAIT_S):
        code = await run
    assert code == 1
    assert exits == []  # a clean stop, not a forced one
    assert f"stopping: {reason}" in caplog.text
    assert f"jfsync stopped: {reason}" in caplog.text
    # No new ledger was started behind the operator's back, and another file was not written.
    assert _at_path(path) == other
