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

import jfsync.emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord
from jfsync.model import PlayState, UserData
from jfsync.ops.reconcilecmd import ReconcileOutcome, copy_ledger, print_outcome, run_reconcile
from jfsync.sync.catchup import NON_DEFAULT_FILTERS
from jfsync.sync.ledger import Ledger
from jfsync.sync.merge import MergePolicy
from tests.identity.conftest import API_KEY, MakeStack, Stack, emulator
from tests.support.cluster import FAST_PUSHER as PUSHER_OPTIONS
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


# --------------------------------------------------------------------------- delivery


def owed_everywhere(named: dict[str, tuple[str, str]]) -> dict[tuple[str, str, str], UserData]:
    """What every server must hold once seed_history's users' data is merged."""
    old_s, new_s = int(OLD.timestamp()), int(NEW.timestamp())
    expected = {
        "played_a": UserData(play_state=PlayState(True, 1, old_s, 0)),
        "fav_b": UserData(favorite=True),
        "rating_b": UserData(rating=7.0),
        "later_b": UserData(play_state=PlayState(True, 3, new_s, 0)),
        "ratings": UserData(rating=8.0),
        "mixed": UserData(favorite=True, play_state=PlayState(False, 1, old_s, 3_000_000_000)),
    }
    found: dict[tuple[str, str, str], UserData] = {}
    for key, state in expected.items():
        x, y = named[key]
        found[("a", x, "alice")] = state
        found[("b", y, "alice")] = state
    found[("a", named["bob"][0], "bob")] = UserData(favorite=True)
    found[("b", named["bob"][1], "bob")] = UserData(favorite=True)
    return found


def a_holds_all_and_b_nothing(stack: Stack, expected: dict[tuple[str, str, str], UserData]) -> bool:
    """a holds everything it was owed, and b was written nothing (its writes failed)."""
    held = all(
        stack.data(s, item, user) == state
        for (s, item, user), state in expected.items()
        if s == "a"
    )
    return held and not stack.writes("b")


def holds_all(stack: Stack, expected: dict[tuple[str, str, str], UserData]) -> bool:
    return all(stack.data(s, item, user) == state for (s, item, user), state in expected.items())


async def test_writes_a_server_refuses_for_a_moment_are_retried_and_made(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    named = seed_history(stack)
    # b answers its next two writes with 503 (a restart, a proxy hiccup).
    stack.emus["b"].fail_next_writes(2, 503)
    outcome = await run_reconcile(stack.config, dry_run=False, pusher_options=PUSHER_OPTIONS)
    assert outcome.ok, outcome.failures
    assert outcome.counts() == {
        ("name:alice", "a"): 4,
        ("name:alice", "b"): 3,
        ("name:bob", "b"): 1,
    }
    assert holds_all(stack, owed_everywhere(named))
    assert [w.status for w in stack.emus["b"].writes].count(503) == 2


async def test_a_refused_key_pauses_that_server_and_its_writes_wait_for_the_next_run(
    make_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    named = seed_history(stack)
    config_file = write_config(tmp_path / "jfsync.yaml", stack.emus, ledger=stack.config.ledger)
    # b reads fine but refuses every write with 401 (the key lost its rights to write).
    stack.emus["b"].fail_next_writes(1000, 401)

    code, text, err = await reconcile_cli(config_file)
    assert code == 1
    assert API_KEY not in text + err
    assert "  failed: b: b refused jfsync's API key" in text
    assert "writes stay queued for later" in text
    assert "user alice:\n  a: 4 items changed\n" in text
    # a got everything it was owed; b nothing, and no write was retried (paused, not hammered).
    expected = owed_everywhere(named)
    assert a_holds_all_and_b_nothing(stack, expected)
    refused = [(w.user_id, w.item_id) for w in stack.emus["b"].writes]
    assert len(refused) == len(set(refused)) >= 1
    async with Ledger(stack.config.ledger, MergePolicy.from_config(stack.config)) as ledger:
        assert await ledger.outbox_depth("b") == 4

    # The key works again: the next run delivers what waited, at once (no retry delay).
    stack.emus["b"].fail_next_writes(0)
    code, text, err = await reconcile_cli(config_file)
    assert code == 0, text + err
    assert "user alice:\n  b: 3 items changed\n" in text
    assert "user bob:\n  b: 1 item changed\n" in text
    assert holds_all(stack, expected)


async def test_a_server_failing_every_write_ends_the_run_with_the_rows_kept(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    named = seed_history(stack)
    # b answers, but every write fails with 500: retried, probed, given up after a while.
    stack.emus["b"].fail_next_writes(10_000, 500)
    out = io.StringIO()
    outcome = await run_reconcile(
        stack.config, dry_run=False, out=out, pusher_options=PUSHER_OPTIONS
    )
    assert not outcome.ok
    text = out.getvalue()
    assert "  failed: b: b failed 4 times: " in text
    assert "4 writes stay queued for later" in text
    expected = owed_everywhere(named)
    assert a_holds_all_and_b_nothing(stack, expected)
    # Nothing lost: the next run, with b well again, delivers it all.
    stack.emus["b"].fail_next_writes(0)
    again = await run_reconcile(stack.config, dry_run=False, pusher_options=PUSHER_OPTIONS)
    assert again.ok, again.failures
    assert holds_all(stack, expected)


async def test_a_server_that_loses_a_users_data_during_the_run_is_not_written_over(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    named = seed_history(stack)
    b = stack.emus["b"]
    alice_b = b.user_id("alice")

    # b loses alice's data (a restore from an empty backup) right after the reconcile has
    # listed her items there, before the writes owed to b are compared and sent.
    def lose_after_the_scan(emu: Emulator, record: RequestRecord) -> None:
        query = {k.lower(): v for k, v in record.query.items()}
        if (
            emu is b
            and record.route == "/Items"
            and query.get("userid") == [alice_b]
            and query.get("filters") == [NON_DEFAULT_FILTERS[-1]]
        ):
            b.wipe_user_data(alice_b)

    emulator_module.request_observers.append(lose_after_the_scan)
    try:
        out = io.StringIO()
        outcome = await run_reconcile(
            stack.config, dry_run=False, out=out, pusher_options=PUSHER_OPTIONS
        )
    finally:
        emulator_module.request_observers.remove(lose_after_the_scan)
    # The two items b had data for and is owed a change on read back as never touched: they
    # are not written over (that would make the loss look like the user's wish), and said so.
    assert outcome.ok, outcome.failures
    assert outcome.deferred == {("name:alice", "b"): 2}
    assert (
        "    (2 items read as never touched on b after the scan; left queued for the next "
        "catch-up to decide)\n"
    ) in out.getvalue()
    held = {named["ratings"][1], named["mixed"][1]}
    assert not stack.writes("b", held)
    assert stack.data("b", named["ratings"][1]) == UserData()

    # The next run's scan sees the whole loss: the reset guard restores b from the ledger.
    again = await run_reconcile(stack.config, dry_run=False, pusher_options=PUSHER_OPTIONS)
    assert again.ok, again.failures
    assert holds_all(stack, owed_everywhere(named))


async def test_a_server_that_goes_away_mid_run_is_given_up_on_after_a_while(
    make_stack: MakeStack,
) -> None:
    stack = await make_stack(
        [emulator("a", root="/mnt/a"), emulator("b", root="/srv/b")], start=False
    )
    named = seed_history(stack)
    b = stack.emus["b"]
    # b shuts down as the first write reaches it (that write and any in flight fail).
    b.fail_next_writes(1000, 503)
    going: list[asyncio.Task[None]] = []

    def go_away(emu: Emulator, record: RequestRecord) -> None:
        if emu is b and record.method != "GET" and not going:
            going.append(asyncio.get_running_loop().create_task(b.stop_listener()))

    emulator_module.request_observers.append(go_away)
    try:
        out = io.StringIO()
        outcome = await run_reconcile(
            stack.config,
            dry_run=False,
            out=out,
            pusher_options={**PUSHER_OPTIONS, "drain_down_wait_s": 0.1},
        )
    finally:
        emulator_module.request_observers.remove(go_away)
        await asyncio.gather(*going)
    # The command did not wait for b forever: it says b is gone and what stays queued.
    assert not outcome.ok
    text = out.getvalue()
    assert "  failed: b: b did not answer for 0.1 s: " in text
    assert "cannot reach" in text
    assert "4 writes stay queued for later" in text
    expected = owed_everywhere(named)
    assert a_holds_all_and_b_nothing(stack, expected)

    # b is back: the next run delivers what waited.
    b.fail_next_writes(0)
    await b.start_listener()
    again = await run_reconcile(stack.config, dry_run=False, pusher_options=PUSHER_OPTIONS)
    assert again.ok, again.failures
    assert holds_all(stack, expected)


@pytest.mark.parametrize("folder", ["jfsync #1", "what?", "sync %41"])
async def test_a_dry_run_reads_a_ledger_whose_folder_name_has_uri_characters(
    tmp_path: Path, folder: str
) -> None:
    """A dry run works on a copy of the ledger; a folder named like ``jfsync #1`` must not cut
    the path short (``#``, ``?`` and ``%`` mean something in an SQLite ``file:`` URI)."""
    source = tmp_path / folder / "ledger.db"
    source.parent.mkdir()
    policy = MergePolicy(servers=("a", "b"))
    async with Ledger(source, policy) as ledger:
        await ledger.map_user("a", "a" * 32, "alice")
    digest = file_digest(source)
    copy = tmp_path / "copy.db"
    await asyncio.to_thread(copy_ledger, source, copy)
    async with Ledger(copy, policy) as copied:
        assert await copied.user_for("a", "a" * 32) == "alice"
    assert file_digest(source) == digest  # read through a read-only connection
