"""``jfsync status`` against a running service: the table, problems first, and exit codes.

The command is synchronous (urllib), so it runs in a worker thread while the event loop keeps
serving the endpoint; the subprocess test runs the real ``python -m jfsync status``.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest

from jfsync.cli import main
from jfsync.ops import statuscmd
from tests.operate.conftest import KEYS, Stack, StackFactory, free_port
from tests.support.config import write_config

pytestmark = pytest.mark.timeout(30)


async def _status(stack: Stack, *args: str, token: str | None = None) -> tuple[int, str]:
    """Run ``jfsync status --url <stack>`` in a thread; return (exit status, output)."""
    out = io.StringIO()

    def call() -> int:
        if "--healthz" in args:
            return statuscmd.check_health(stack.url, token, timeout_s=5, out=out)
        return statuscmd.show_status(
            stack.url, token, timeout_s=5, strict="--strict" in args, raw="--json" in args, out=out
        )

    code = await asyncio.to_thread(call)
    return code, out.getvalue()


async def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the real command line in a thread; return (exit status, stdout + stderr)."""
    code = await asyncio.to_thread(main, argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


async def _pause_home(stack: Stack) -> None:
    stack.home.fail_next_writes(1, 401)
    stack.change(stack.cabin, stack.items[3], is_favorite=True)

    async def paused() -> bool:
        return stack.service.links["home"].pusher.stats.pause_reason is not None

    await stack.wait_for(paused)


async def _dead_row_on_cabin(stack: Stack) -> None:
    stack.cabin.fail_next_writes(1, 404)
    stack.change(stack.home, stack.items[4], rating=3.0)

    async def parked() -> bool:
        return len(await stack.service.ledger.dead_rows("cabin")) == 1

    await stack.wait_for(parked)


async def test_healthy_service_prints_tables_and_exits_0(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.flow(stack.home, stack.items[0], is_favorite=True)

    code, out = await _status(stack)

    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"jfsync 0.1.0 at {stack.url}, up ")
    assert "No problems." in lines
    for heading in ("SERVERS", "SOCKETS", "PEERS (writes owed to each server)", "ITEM MATCHING"):
        assert heading in lines
    sockets = [line.split() for line in lines if " alice " in line or " bob " in line]
    assert sorted((row[0], row[1], row[2]) for row in sockets) == [
        ("cabin", "alice", "connected"),
        ("cabin", "bob", "connected"),
        ("home", "alice", "connected"),
        ("home", "bob", "connected"),
    ]
    peers = {
        line.split()[0]: line.split()
        for line in lines
        if line.split()[:2] in (["home", "ok"], ["cabin", "ok"])
    }
    assert set(peers) == {"home", "cabin"}
    assert peers["cabin"][5] == "1"  # DONE: the favourite written to cabin


async def test_paused_peer_exits_1_with_the_reason_listed_first(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await _pause_home(stack)

    code, out = await _status(stack)

    assert code == statuscmd.EXIT_PROBLEMS, out
    lines = out.splitlines()
    assert lines[2] == "PROBLEMS"
    assert lines[3].startswith("  ERROR peer home is paused: home refused jfsync's API key")
    assert "check servers[].api_key" in lines[3]
    assert lines.index("PROBLEMS") < lines.index("SERVERS")
    [home_peer] = [line for line in lines if line.split()[:2] == ["home", "PAUSED"]]
    assert home_peer


async def test_dead_rows_exit_1_and_are_listed_with_their_reasons(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await _dead_row_on_cabin(stack)

    code, out = await _status(stack)

    assert code == statuscmd.EXIT_PROBLEMS, out
    lines = out.splitlines()
    assert lines[2] == "PROBLEMS"
    assert lines[3] == "  ERROR peer cabin has 1 dead row(s) (writes parked; not retried):"
    # The item by its name in the library index (the key is in --json).
    name = stack.cabin.item(stack.items[4]).name
    assert lines[4].strip().startswith(f"name:alice / {name} ("), lines[4]
    assert "HTTP 404" in lines[4]


async def test_blocking_problems_come_before_warnings(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await _dead_row_on_cabin(stack)
    await _pause_home(stack)
    await stack.cabin.stop_listener()

    def lost() -> bool:
        subs = stack.service.links["cabin"].subscribers.values()
        return all(str(s.status.state) != "connected" for s in subs)

    await stack.wait_for(lost)

    code, out = await _status(stack)

    assert code == statuscmd.EXIT_PROBLEMS
    problems = [line for line in out.splitlines() if line.startswith(("  ERROR", "  WARN"))]
    kinds = [line.split()[0] for line in problems]
    assert kinds[:2] == ["ERROR", "ERROR"], problems
    assert set(kinds[2:]) == {"WARN"}, problems
    assert any("socket cabin/alice not connected (" in line for line in problems)


async def test_warnings_alone_exit_0_unless_strict(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.cabin.stop_listener()

    def lost() -> bool:
        subs = stack.service.links["cabin"].subscribers.values()
        return all(str(s.status.state) != "connected" for s in subs)

    await stack.wait_for(lost)

    code, out = await _status(stack)
    assert code == 0, out
    assert "  WARN  socket cabin/alice not connected (" in out
    code, _ = await _status(stack, "--strict")
    assert code == statuscmd.EXIT_PROBLEMS


async def test_unreachable_endpoint_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out = await _main(["status", "--url", url], capsys)
    assert code == statuscmd.EXIT_UNREACHABLE
    assert f"cannot reach {url}/status" in out
    code, out = await _main(["status", "--url", url, "--healthz"], capsys)
    assert code == 1  # a container HEALTHCHECK only knows 0 and 1
    assert out.startswith("unhealthy: cannot reach")


async def test_token_from_flag_env_or_config_and_never_printed(
    make_stack: StackFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    token = "statuscmd-token-5be1c0de"
    stack = await make_stack(token=token, connect=False)
    monkeypatch.delenv(statuscmd.TOKEN_ENV, raising=False)

    code, out = await _main(["status", "--url", stack.url], capsys)
    assert code == statuscmd.EXIT_UNREACHABLE
    assert f"401: pass --token or set {statuscmd.TOKEN_ENV}" in out
    code, out = await _main(["status", "--url", stack.url, "--token", "wrong-token"], capsys)
    assert code == statuscmd.EXIT_UNREACHABLE
    assert "401: wrong token" in out
    code, out = await _main(["status", "--url", stack.url, "--token", token, "--json"], capsys)
    assert code == 0, out
    assert json.loads(out)["servers"][0]["name"] == "home"
    assert token not in out

    monkeypatch.setenv(statuscmd.TOKEN_ENV, token)
    code, out = await _main(["status", "--url", stack.url, "--healthz"], capsys)
    assert (code, out) == (0, "healthy\n")
    monkeypatch.delenv(statuscmd.TOKEN_ENV)

    # --config: the URL from status.listen, the token from status.token_file.
    (tmp_path / "status.token").write_text(token + "\n")
    config = write_config(
        tmp_path / "jfsync.yaml",
        {"home": "http://127.0.0.1:1", "cabin": "http://127.0.0.1:2"},
        api_key=KEYS,
        status={"listen": f"0.0.0.0:{stack.server.port}", "token_file": "status.token"},
    )
    code, out = await _main(["status", "--config", str(config)], capsys)
    assert code == 0, out
    assert out.startswith(f"jfsync 0.1.0 at http://127.0.0.1:{stack.server.port}, up ")
    assert token not in out


async def test_invalid_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("status:\n  listen: nowhere\nservers: []\n")
    code, out = await _main(["status", "--config", str(config)], capsys)
    assert code == statuscmd.EXIT_CONFIG
    assert "status.listen" in out


async def test_healthz_mode(make_stack: StackFactory) -> None:
    stack = await make_stack()
    assert await _status(stack, "--healthz") == (0, "healthy\n")
    ledger = stack.service.ledger
    await ledger.close()
    try:
        code, out = await _status(stack, "--healthz")
    finally:
        await ledger.open()
    assert code == 1
    assert out.startswith("unhealthy: HTTP 503: the ledger is not writable")


async def test_the_installed_command_runs_as_a_process(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await _dead_row_on_cabin(stack)
    for args, expected in (([], statuscmd.EXIT_PROBLEMS), (["--healthz"], 0)):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jfsync",
            "status",
            "--url",
            stack.url,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        assert process.returncode == expected, output.decode()
    assert b"ERROR peer cabin has 1 dead row(s)" in (await _status(stack))[1].encode()


def test_problems_are_found_in_a_snapshot_without_a_server() -> None:
    snapshot = {
        "version": "0.1.0",
        "now_ms": 10_000,
        "uptime_s": 3725.0,
        "servers": [
            {
                "name": "home",
                "url": "http://home:8096",
                "reachable": False,
                "version": None,
                "server_id": None,
                "last_error": "[home] cannot connect",
                "users": [],
                "outbox": {
                    "depth": 3,
                    "oldest_age_s": 65.0,
                    "in_flight": 0,
                    "writes_done": 0,
                    "writes_skipped": 0,
                    "failures": 2,
                    "dead_parked": 0,
                    "down_since_ms": 4_000,
                    "pause_reason": None,
                    "last_error": "[home] cannot connect",
                    "dead": [],
                },
            }
        ],
        "counters": {},
        "identity": {
            "pairs": [{"servers": ["home", "cabin"], "matched": 5, "unmatched": 0, "ambiguous": 2}]
        },
        "ledger": {
            "path": "/data/jfsync.db",
            "size_bytes": 3 * 1024 * 1024,
            "index_path": "/data/jfsync.db.index",
            "index_size_bytes": 5 * 1024 * 1024,
        },
        "reconcile": {"last_at_ms": None, "last_result": None},
    }
    text, problems = statuscmd.render(snapshot, "http://x")
    # Reached once and down now: said once, as down (never "not reachable: not reached yet").
    assert [p.blocking for p in problems] == [False, False]
    assert problems[0].text.startswith("peer home is down for writes for 6s; 3 write(s) queued")
    assert problems[1].text == "2 item(s) match ambiguously between home and cabin (not synced)"
    assert "jfsync 0.1.0 at http://x, up 1h 02m" in text
    assert "Ledger: /data/jfsync.db (3.0 MiB)" in text
    assert "Library index: /data/jfsync.db.index (5.0 MiB)" in text
    assert "Last full reconcile: not yet" in text
