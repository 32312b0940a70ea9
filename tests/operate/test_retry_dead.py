"""Dead rows come back: ``jfsync retry-dead`` (beside a running jfsync or not) and newer changes.

A write the peer refused as wrong (400, 404) is parked as dead and ``jfsync status`` exits 1
until someone acts. These tests check, against two emulators over loopback, that the operator
can send it again (through the status endpoint while ``jfsync run`` holds the ledger, or in the
ledger file when it does not), and that a newer change by the user revives it by itself.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from jfsync.cli import main
from jfsync.model import UserData
from jfsync.ops import statuscmd
from jfsync.sync.ledger import Ledger
from jfsync.sync.merge import MergePolicy
from tests.operate.conftest import Stack, StackFactory, free_port
from tests.support.config import write_config

pytestmark = pytest.mark.timeout(40)

TOKEN = "retry-dead-status-token-0123"


async def _status_exit(stack: Stack) -> tuple[int, str]:
    """``jfsync status`` against the stack, in a thread: (exit status, output)."""
    out = io.StringIO()
    code = await asyncio.to_thread(
        statuscmd.show_status, stack.url, stack.token, timeout_s=5, out=out
    )
    return code, out.getvalue()


async def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The real command line in a thread: (exit status, stdout, stderr)."""
    code = await asyncio.to_thread(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _config_file(stack: Stack, tmp_path: Path) -> Path:
    """The stack's config as a YAML file, its status endpoint where the stack serves it."""
    config = stack.service.config
    status: dict[str, str] = {"listen": f"127.0.0.1:{stack.server.port}"}
    if stack.token:
        status["token"] = stack.token
    return write_config(
        tmp_path / "jfsync.yaml",
        {s.name: s.url for s in config.servers},
        api_key={s.name: s.api_key.get_secret_value() if s.api_key else "" for s in config.servers},
        ledger=config.ledger,
        status=status,
    )


async def _rejected_by_cabin(stack: Stack, item: str, rating: float) -> UserData:
    """The user rates ``item`` on home; cabin refuses the write with 400: the row is parked."""
    stack.cabin.fail_next_writes(1, 400)
    expected = stack.change(stack.home, item, rating=rating)

    async def parked() -> bool:
        return len(await stack.service.ledger.dead_rows("cabin")) == 1

    await stack.wait_for(parked)
    assert stack.user_data(stack.cabin, item) != expected
    code, out = await _status_exit(stack)
    assert code == 1, out
    assert "peer cabin has 1 dead row(s)" in out
    return expected


async def test_retry_dead_beside_a_running_jfsync_delivers_the_parked_write(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack(token=TOKEN)
    item = stack.items[4]
    expected = await _rejected_by_cabin(stack, item, 3.0)
    config = _config_file(stack, tmp_path)
    # The route needs the status token like every other one.
    assert (await stack.get("/retry-dead", token=False, method="POST"))[0] == 401
    assert len(await stack.service.ledger.dead_rows("cabin")) == 1

    # Only the rows owed to home: there are none, and cabin's stays parked.
    code, out, err = await _cli(["retry-dead", "--config", str(config), "--server", "home"], capsys)
    assert (code, out) == (0, "home: 0 dead rows revived\n"), err
    assert "a running jfsync holds the ledger; asking it at" in err
    assert len(await stack.service.ledger.dead_rows("cabin")) == 1

    code, out, err = await _cli(["retry-dead", "--config", str(config)], capsys)
    assert (code, out) == (0, "home: 0 dead rows revived\ncabin: 1 dead row revived\n"), err
    assert TOKEN not in out + err

    # The user's rating is now on every server, and nothing is left to act on.
    await stack.wait_for(lambda: stack.user_data(stack.cabin, item) == expected)
    assert stack.user_data(stack.home, item) == expected
    code, out = await _status_exit(stack)
    assert code == 0, out
    assert await stack.service.ledger.dead_rows("cabin") == []


async def test_a_newer_change_by_the_user_revives_a_dead_row(make_stack: StackFactory) -> None:
    stack = await make_stack()
    item = stack.items[5]
    await _rejected_by_cabin(stack, item, 3.0)

    # The user changes their mind about the rating on home: the parked row goes live again
    # with the newer value and cabin takes it.
    expected = stack.change(stack.home, item, rating=4.0)
    await stack.wait_for(lambda: stack.user_data(stack.cabin, item) == expected)
    assert stack.user_data(stack.home, item) == expected
    assert await stack.service.ledger.dead_rows("cabin") == []
    code, out = await _status_exit(stack)
    assert code == 0, out


async def test_retry_dead_without_a_running_jfsync_revives_rows_in_the_ledger_file(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack()
    item = stack.items[6]
    expected = await _rejected_by_cabin(stack, item, 2.0)
    config = _config_file(stack, tmp_path)
    await stack.server.stop()
    await stack.service.stop()  # jfsync run has stopped: the ledger is free

    code, out, err = await _cli(["retry-dead", "--config", str(config)], capsys)
    assert (code, out) == (0, "home: 0 dead rows revived\ncabin: 1 dead row revived\n"), err
    assert "asking it" not in err  # the ledger itself, no endpoint involved

    # The next jfsync run delivers it.
    service = await stack.start_service(config=stack.service.config, connect=False)
    try:
        await service.wait_for(lambda: stack.user_data(stack.cabin, item) == expected, 20.0)
        assert await service.ledger.dead_rows("cabin") == []
    finally:
        await stack.stop_service()
    assert stack.user_data(stack.home, item) == expected


async def test_retry_dead_bad_arguments_and_unreachable_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "ledger.db"
    config = write_config(
        tmp_path / "jfsync.yaml",
        {"home": "http://127.0.0.1:1", "cabin": "http://127.0.0.1:2"},
        api_key={"home": "k" * 32, "cabin": "c" * 32},
        ledger=ledger,
    )

    code, _, err = await _cli(["retry-dead"], capsys)
    assert code == 2
    assert "give --config FILE" in err
    code, _, err = await _cli(["retry-dead", "--config", str(config), "--server", "attic"], capsys)
    assert code == 2
    assert "--server attic: no such server" in err
    assert "home, cabin" in err
    # No ledger there yet: nothing to revive, and none is created.
    code, _, err = await _cli(["retry-dead", "--config", str(config)], capsys)
    assert code == 1
    assert f"there is no ledger at {ledger}" in err
    assert not ledger.exists()
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = await _cli(["retry-dead", "--url", url], capsys)
    assert code == 3
    assert "cannot reach" in err

    # A ledger with nothing dead: zero for each server.
    async with Ledger(ledger, MergePolicy(servers=("home", "cabin"))):
        pass
    code, out, err = await _cli(["retry-dead", "--config", str(config)], capsys)
    assert (code, out) == (0, "home: 0 dead rows revived\ncabin: 0 dead rows revived\n"), err
