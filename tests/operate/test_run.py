"""``jfsync run`` as a process serves the status endpoint, and stops cleanly on SIGTERM.

Two emulators run in the test's event loop; ``python -m jfsync run`` runs as a child process
with a config whose ``status.listen`` is a free loopback port. The test waits on the child's
log lines (events), never on time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from jfsync.emulator import Emulator
from tests.operate.conftest import KEYS, free_port
from tests.support.config import write_config
from tests.support.waiting import WAIT_S, emulator_requests, wait_until

pytestmark = pytest.mark.timeout(40)
TOKEN = "run-test-status-token-41c7"


def _config(tmp_path: Path, emus: dict[str, Emulator], port: int) -> Path:
    (tmp_path / "status.token").write_text(TOKEN)
    return write_config(
        tmp_path / "jfsync.yaml",
        emus,
        api_key=KEYS,
        ledger=tmp_path / "jfsync.db",
        logging={"level": "info"},
        sync={"shutdown_grace": "5s"},
        status={"listen": f"127.0.0.1:{port}", "token_file": "status.token"},
    )


async def _wait_line(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> str:
    async with asyncio.timeout(WAIT_S):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before {needle!r}:\n{''.join(seen)}")
            seen.append(line)
            if needle in line:
                return line


async def _stop(process: asyncio.subprocess.Process, seen: list[str]) -> int:
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    async with asyncio.timeout(WAIT_S):
        seen += [line.decode() async for line in process.stderr]
        return await process.wait()


async def test_run_serves_status_until_sigterm(
    emulators: dict[str, Emulator], tmp_path: Path
) -> None:
    port = free_port()
    config = _config(tmp_path, emulators, port)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jfsync",
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
    )
    seen: list[str] = []
    try:
        assert process.stderr is not None
        await _wait_line(process.stderr, "status endpoint on", seen)
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"http://127.0.0.1:{port}/healthz", headers=auth) as response:
                assert response.status == 200
            async with http.get(f"http://127.0.0.1:{port}/status") as response:
                assert response.status == 401
            async with http.get(f"http://127.0.0.1:{port}/status", headers=auth) as response:
                body = json.loads(await response.text())
        assert [s["name"] for s in body["servers"]] == ["home", "cabin"]
        code = await _stop(process, seen)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = "".join(seen)
    assert code == 0, log
    assert "jfsync stopped" in log
    assert TOKEN not in log
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))


async def test_run_keeps_replicating_when_the_status_port_is_taken(
    emulators: dict[str, Emulator], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        config = _config(tmp_path, emulators, port)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jfsync",
            "run",
            "--config",
            str(config),
            stderr=asyncio.subprocess.PIPE,
        )
        seen: list[str] = []
        try:
            assert process.stderr is not None
            line = await _wait_line(process.stderr, "cannot serve the status endpoint", seen)
            assert f"127.0.0.1:{port}" in line
            assert "change status.listen" in line
            # Still replicating: a change on home reaches cabin.
            home, cabin = emulators["home"], emulators["cabin"]
            item = home.leaf_items()[0].id
            expected = home.save_user_data(home.user_id("alice"), item, is_favorite=True)
            with emulator_requests() as changed:
                await wait_until(
                    lambda: cabin.user_data(cabin.user_id("alice"), item) == expected,
                    WAIT_S,
                    changed=changed,
                )
            code = await _stop(process, seen)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert code == 0, "".join(seen)
