"""``jfsync reconcile``: a dry run writes nothing, and the real run does exactly what it said.

Two servers with existing, different history (different path roots, so different item ids)
and no ledger yet: the first reconcile must merge by the first-contact rules (played history,
favourites and ratings found on one side only are kept, never erased). The dry run must leave
every server's state, the write log and the ledger file as they were; its counts per user and
server must equal what the real run then writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jfsync.emulator import Emulator
from jfsync.model import PlayState, UserData
from jfsync.sync.ledger import Ledger
from jfsync.sync.merge import MergePolicy
from jfsync.sync.reconcile import ReconcileOutcome, print_outcome, run_reconcile
from tests.identity.conftest import API_KEY, MakeStack, Stack, emulator
from tests.support.config import write_config

pytestmark = pytest.mark.timeout(60)

OLD = datetime(2024, 1, 1, 12, tzinfo=UTC)
NEW = datetime(2025, 1, 1, 12, tzinfo=UTC)


def seed_history(stack: Stack) -> dict[str, tuple[str, str]]:
    """Give both servers unequal history; return name -> (id on a, id on b)."""
    pairs = [(x.id, y.id) for x, y in stack.pairs("a", "b")]
    named = dict(
        zip(
            ["played_a", "fav_b", "rating_b", "later_b", "ratings", "mixed", "bob", "same"],
            pairs,
            strict=False,
        )
    )
    change = stack.change
    change("a", named["played_a"][0], played=True, play_count=1, last_played=OLD)
    change("b", named["fav_b"][1], is_favorite=True)
    change("b", named["rating_b"][1], rating=7.0)
    change("a", named["later_b"][0], played=True, play_count=1, last_played=OLD)
    change("b", named["later_b"][1], played=True, play_count=3, last_played=NEW)
    change("a", named["ratings"][0], rating=8.0)
    change("b", named["ratings"][1], rating=4.0)
    change("a", named["mixed"][0], is_favorite=True)
    change("b", named["mixed"][1], position_ticks=3_000_000_000, play_count=1, last_played=OLD)
    change("a", named["bob"][0], "bob", is_favorite=True)
    change("a", named["same"][0], is_favorite=True)
    change("b", named["same"][1], is_favorite=True)
    return named


def snapshot(emus: dict[str, Emulator]) -> dict[tuple[str, str, str], UserData]:
    """Every user's data on every leaf item of every server."""
    return {
        (name, user.name, item.id): emu.user_data(user.id, item.id)
        for name, emu in emus.items()
        for user in emu.users.values()
        for item in emu.leaf_items()
    }


def file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


async def reconcile_cli(config_file: Path, *extra: str) -> tuple[int | None, str, str]:
    """Run ``python -m jfsync reconcile --config FILE *extra``; return status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jfsync",
        "reconcile",
        "--config",
        str(config_file),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def test_dry_run_writes_nothing_and_the_real_run_does_what_it_said(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    named = seed_history(stack)
    config, emus = stack.config, stack.emus
    for emu in emus.values():
        await emu.flush_now()
        emu.writes.clear()
        emu.requests.clear()
    before = snapshot(emus)

    dry = await run_reconcile(config, dry_run=True)
    assert dry.ok, (dry.problems, dry.failures)
    short = io.StringIO()
    print_outcome(dry, short, sample=1)
    assert "user alice:\n  a: 4 items would change\n" in short.getvalue()
    assert "    ... and 3 more\n  b: 3 items would change\n" in short.getvalue()
    assert not config.ledger.exists()  # no ledger yet, and the dry run did not make one
    assert snapshot(emus) == before
    assert all(not emu.writes for emu in emus.values())
    assert {r.method for emu in emus.values() for r in emu.requests} == {"GET"}

    # Again with a ledger file present: its bytes stay the same.
    async with Ledger(config.ledger, MergePolicy.from_config(config)):
        pass
    digest = file_digest(config.ledger)
    again = await run_reconcile(config, dry_run=True)
    assert file_digest(config.ledger) == digest
    assert snapshot(emus) == before
    assert again.counts() == dry.counts()

    real = await run_reconcile(config, dry_run=False)
    assert real.ok, (real.problems, real.failures)
    assert real.counts() == dry.counts()
    assert _planned(real) == _planned(dry)
    for name, emu in emus.items():
        written = {(w.user_id, w.item_id) for w in emu.writes if w.status < 300}
        planned = {
            (emu.user_id(real.user_names[w.user]), w.remote_item_id)
            for w in real.writes
            if w.server == name
        }
        assert written == planned

    # First contact kept everyone's history.
    def both(key: str, expected: UserData, user: str = "alice") -> None:
        x, y = named[key]
        assert stack.data("a", x, user) == expected
        assert stack.data("b", y, user) == expected

    old_s, new_s = int(OLD.timestamp()), int(NEW.timestamp())
    both("played_a", UserData(play_state=PlayState(True, 1, old_s, 0)))
    both("fav_b", UserData(favorite=True))
    both("rating_b", UserData(rating=7.0))
    both("later_b", UserData(play_state=PlayState(True, 3, new_s, 0)))
    both("ratings", UserData(rating=8.0))  # both set: the first server in config order
    both("mixed", UserData(favorite=True, play_state=PlayState(False, 1, old_s, 3_000_000_000)))
    both("bob", UserData(favorite=True), "bob")
    both("same", UserData(favorite=True))
    assert real.counts() == {("name:alice", "a"): 4, ("name:alice", "b"): 3, ("name:bob", "b"): 1}

    # Nothing is left to do.
    after = await run_reconcile(config, dry_run=True)
    assert after.writes == []
    assert after.ok


def _planned(outcome: ReconcileOutcome) -> set[tuple[str, str, str, UserData, UserData]]:
    return {(w.server, w.user, w.item, w.before, w.after) for w in outcome.writes}


async def test_the_command_prints_per_user_and_server_what_would_change(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    named = seed_history(stack)
    config_file = write_config(
        tmp_path / "jfsync.yaml", stack.emus, ledger=tmp_path / "cli-ledger.db"
    )

    code, text, err = await reconcile_cli(config_file, "--dry-run", "--sample", "4")
    assert code == 0, err
    assert API_KEY not in text + err
    assert "items a <-> b: 24 matched, 0 only on a, 0 only on b, 0 ambiguous" in text
    assert "user alice:\n  a: 4 items would change\n" in text
    assert "  b: 3 items would change\n" in text
    assert "user bob:\n  b: 1 item would change\n" in text
    # The sample names the item and shows before -> after.
    later = stack.emus["a"].item(named["later_b"][0])
    assert (
        f"    {later.name} ({later.year}) [Movie]: played (1 play, last 2024-01-01 12:00) -> "
        "played (3 plays, last 2025-01-01 12:00)\n"
    ) in text
    assert "dry run: no server was written to and the ledger file was not modified" in text
    assert not (tmp_path / "cli-ledger.db").exists()
    assert all(not emu.writes for emu in stack.emus.values())


async def test_an_unreachable_server_stops_the_command_before_anything_is_done(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    seed_history(stack)
    await stack.emus["b"].stop_listener()
    out = io.StringIO()
    outcome = await run_reconcile(stack.config, dry_run=False, out=out)
    assert not outcome.ok
    assert outcome.writes == []
    assert "problem: " in out.getvalue()
    assert "cannot reach" in out.getvalue()
    assert all(not emu.writes for emu in stack.emus.values())


async def test_a_real_reconcile_refuses_a_ledger_jfsync_run_has_open(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack([emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")])
    config_file = write_config(tmp_path / "jfsync.yaml", stack.emus, ledger=stack.config.ledger)

    # The running service (this process) holds the ledger: a second writer is refused,
    # clearly, before touching any server.
    code, _, err = await reconcile_cli(config_file)
    assert code == 1
    assert f"jfsync reconcile: the ledger {stack.config.ledger} is in use" in err
    assert f"pid {os.getpid()}" in err
    assert "Traceback" not in err
    assert all(not emu.writes for emu in stack.emus.values())
    # A dry run works on a copy and may run beside it.
    code, out, err = await reconcile_cli(config_file, "--dry-run")
    assert code == 0, err
    assert "dry run: no server was written to" in out
