"""``jfsync watch`` against two emulators: one line per live event, secrets never printed."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jfsync.cli import main
from jfsync.config import Config, load_config
from jfsync.emulator import Emulator
from jfsync.ops.watch import watch
from jfsync.timing import ManualClock
from tests.support.config import write_config

from .helpers import IO_TIMEOUT_S

KEYS = {"alpha": "a1" * 16, "beta": "b2" * 16}


@pytest.fixture
def emu_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def emulators(emu_clock: ManualClock) -> AsyncIterator[dict[str, Emulator]]:
    alpha = Emulator(
        api_key=KEYS["alpha"], library_size=20, seed=1, clock=emu_clock, server_name="alpha"
    )
    beta = Emulator(
        api_key=KEYS["beta"],
        library_size=20,
        seed=1,
        clock=emu_clock,
        server_name="beta",
        path_root="/srv",
    )
    async with alpha, beta:
        yield {"alpha": alpha, "beta": beta}


def write_urls(tmp_path: Path, urls: dict[str, str]) -> Path:
    return write_config(tmp_path / "jfsync.yaml", urls, api_key=KEYS)


def config_for(tmp_path: Path, emulators: dict[str, Emulator]) -> Config:
    return load_config(write_urls(tmp_path, {n: e.url for n, e in emulators.items()}))


async def until_text(buffer: io.StringIO, needle: str, count: int = 1) -> str:
    async with asyncio.timeout(IO_TIMEOUT_S):
        while buffer.getvalue().count(needle) < count:  # noqa: ASYNC110 - loopback I/O
            await asyncio.sleep(0)
    return buffer.getvalue()


async def test_watch_prints_one_line_per_event_for_every_user_of_every_server(
    tmp_path: Path, emulators: dict[str, Emulator], emu_clock: ManualClock
) -> None:
    config = config_for(tmp_path, emulators)
    out, err, stop = io.StringIO(), io.StringIO(), asyncio.Event()
    task = asyncio.create_task(
        watch(config, ["alpha", "beta"], out=out, err=err, clock=ManualClock(), stop=stop),
        name="watch",
    )
    try:
        await until_text(out, "state=connected", 4)
        alpha = emulators["alpha"]
        ep = next(i for i in alpha.leaf_items() if i.type == "Episode")
        alpha.save_user_data(alpha.user_id("bob"), ep.id, played=True, play_count=2)
        await emu_clock.advance(0.5)
        text = await until_text(out, f" {ep.id} ")
        (line,) = [ln for ln in text.splitlines() if f" {ep.id} " in ln]
        time, server, user, item, *fields = line.split()
        assert time.endswith("Z")
        assert (server, user, item) == ("alpha", "bob", ep.id)
        assert "played=yes" in fields
        assert "count=2" in fields
        assert "favorite=no" in fields
        assert any(f"{ep.season_id} folder" in ln for ln in text.splitlines())
    finally:
        stop.set()
        async with asyncio.timeout(IO_TIMEOUT_S):
            assert await task == 0
    assert "alpha: Jellyfin 10.10.7, watching alice, bob" in err.getvalue()
    everything = out.getvalue() + err.getvalue()
    for emu in emulators.values():
        for token in [*emu.tokens, *KEYS.values()]:
            assert token not in everything


async def test_watch_one_server_and_survive_an_unreachable_one(
    tmp_path: Path, emulators: dict[str, Emulator]
) -> None:
    await emulators["beta"].stop_listener()
    config = config_for(tmp_path, emulators)
    out, err, stop = io.StringIO(), io.StringIO(), asyncio.Event()
    task = asyncio.create_task(
        watch(config, ["alpha", "beta"], out=out, err=err, clock=ManualClock(), stop=stop),
        name="watch",
    )
    try:
        await until_text(out, "state=connected", 2)
        assert "beta: cannot watch:" in err.getvalue()
        assert all(line.split()[1] == "alpha" for line in out.getvalue().splitlines())
    finally:
        stop.set()
        async with asyncio.timeout(IO_TIMEOUT_S):
            assert await task == 0


async def test_watch_with_no_reachable_server_exits_non_zero(
    tmp_path: Path, emulators: dict[str, Emulator]
) -> None:
    config = config_for(tmp_path, emulators)
    await emulators["alpha"].stop_listener()
    out, err = io.StringIO(), io.StringIO()
    assert await watch(config, ["alpha"], out=out, err=err, stop=asyncio.Event()) == 1
    assert "nothing to watch" in err.getvalue()


def test_cli_rejects_an_unknown_server_and_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_urls(tmp_path, {"alpha": "http://127.0.0.1:9", "beta": "http://127.0.0.1:9"})
    assert main(["watch", "--config", str(path), "--server", "gamma"]) == 2
    assert "--server gamma: no such server" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: []\n", encoding="utf-8")
    assert main(["watch", "--config", str(bad)]) == 2
    # One line per problem, naming the file and the key (as every command does).
    assert f"{bad}: (top level): at least two servers are needed" in capsys.readouterr().err


@pytest.mark.timeout(30)
async def test_cli_watch_runs_until_ctrl_c_and_exits_zero(
    tmp_path: Path, emulators: dict[str, Emulator], emu_clock: ManualClock
) -> None:
    path = write_urls(tmp_path, {n: e.url for n, e in emulators.items()})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jfsync",
        "watch",
        "--config",
        str(path),
        "--server",
        "alpha",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            connected = 0
            while connected < 2:
                line = (await proc.stdout.readline()).decode()
                assert line, "watch ended early"
                connected += "state=connected" in line
            alpha = emulators["alpha"]
            movie = next(i for i in alpha.leaf_items() if i.type == "Movie")
            alpha.save_user_data(alpha.user_id("alice"), movie.id, is_favorite=True)
            await emu_clock.advance(0.5)
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "watch ended early"
                if f" {movie.id} " in line:
                    break
        assert line.split()[1:3] == ["alpha", "alice"]
        assert "favorite=yes" in line
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            rest, errors = await proc.communicate()
        assert proc.returncode == 0, errors.decode()
        for secret in KEYS.values():
            assert secret not in (rest + errors).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
