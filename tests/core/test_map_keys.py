"""Stable keys for ``users.map`` entries, and the move of old positional keys at open.

A person matched by a map entry used to be keyed by the entry's position (``map:0``), so
reordering the list swapped two people's histories in the ledger. Keys now come from the
entry's content; a ledger with positional keys is moved over when it is opened with the
config's map, each key going to the entry that names the accounts the ledger recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from jfsync.config import Config
from jfsync.jellyfin.wire import UserDto
from jfsync.model import UserData
from jfsync.sync.ledger import Ledger, Observation
from jfsync.sync.merge import MergePolicy
from jfsync.sync.users import map_entry_key, match_users, plan_map_key_migration

pytestmark = pytest.mark.timeout(20)

POLICY = MergePolicy(servers=("home", "cabin"))
ALICE = {"home": "alice", "cabin": "Alicia"}
BOB = {"home": "bob", "cabin": "robert"}


def _config(entries: list[dict[str, str]]) -> Config:
    return Config.model_validate(
        {
            "servers": [
                {"name": "home", "url": "http://127.0.0.1:1", "api_key": "k" * 32},
                {"name": "cabin", "url": "http://127.0.0.1:2", "api_key": "c" * 32},
            ],
            "users": {"match": "map", "map": entries},
        }
    )


def _user(name: str, uid: str) -> UserDto:
    return UserDto.model_validate({"Name": name, "Id": uid})


def test_a_map_key_follows_the_entry_not_its_place_or_spelling() -> None:
    key = map_entry_key(ALICE)
    assert key == "map:cabin=alicia,home=alice"
    assert map_entry_key({"cabin": "ALICIA", "home": "Alice"}) == key
    assert map_entry_key(BOB) != key
    # Names cannot forge another entry's key: separators in names are escaped.
    assert map_entry_key({"home": "a,cabin=b"}) != map_entry_key({"home": "a", "cabin": "b"})


def test_reordering_the_map_gives_every_person_the_same_key() -> None:
    users = {
        "home": [_user("alice", "a" * 32), _user("bob", "b" * 32)],
        "cabin": [_user("Alicia", "c" * 32), _user("robert", "d" * 32)],
    }
    before = match_users(_config([ALICE, BOB]), users)
    after = match_users(_config([{"cabin": "robert", "home": "bob"}, ALICE]), users)

    def keys(match: object) -> dict[str, str]:
        return {u.accounts["home"].name: u.key for u in match.users}  # type: ignore[attr-defined]

    assert keys(before) == keys(after) == {"alice": map_entry_key(ALICE), "bob": map_entry_key(BOB)}


def test_the_migration_plan_trusts_names_not_positions() -> None:
    old = {"map:0": {"home": "alice", "cabin": "alicia"}, "map:1": {"home": "bob", "cabin": None}}
    renames, problems = plan_map_key_migration(old, [BOB, ALICE])
    assert renames == {"map:0": map_entry_key(ALICE), "map:1": map_entry_key(BOB)}
    assert problems == []

    renames, problems = plan_map_key_migration(
        {**old, "map:2": {"home": "carol"}, "map:3": {}}, [ALICE]
    )
    assert renames == {"map:0": map_entry_key(ALICE)}
    assert problems == [
        "ledger user map:1 (home=bob): no users.map entry names these accounts; left as it is",
        "ledger user map:2 (home=carol): no users.map entry names these accounts; left as it is",
        "ledger user map:3: no account names recorded; left as it is",
    ]


async def _old_ledger(path: Path, item: str) -> None:
    """A ledger as jfsync wrote it with positional keys: alice (map:0) favourited ``item``."""
    async with Ledger(path, POLICY) as ledger:
        for key, entry, ids in (
            ("map:0", ALICE, ("h-alice", "c-alicia")),
            ("map:1", BOB, ("h-bob", "c-bob")),
        ):
            await ledger.map_user("home", ids[0], key, name=entry["home"])
            await ledger.map_user("cabin", ids[1], key, name=entry["cabin"])
        await ledger.map_item("home", item, item)
        await ledger.map_item("cabin", item, item)
        await ledger.apply_observations(
            [Observation("home", "map:0", item, UserData(favorite=True), 1_000)]
        )


async def test_a_ledger_with_positional_keys_keeps_each_persons_data_after_a_reorder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jfsync")
    path = tmp_path / "ledger.db"
    item = "f" * 32
    await _old_ledger(path, item)
    reordered = [{"cabin": "robert", "home": "bob"}, ALICE]

    for _ in range(2):  # the second open finds nothing to move
        async with Ledger(path, POLICY, user_map=reordered) as ledger:
            alice, bob = map_entry_key(ALICE), map_entry_key(BOB)
            assert await ledger.user_for("home", "h-alice") == alice
            assert await ledger.user_for("cabin", "c-alicia") == alice
            assert await ledger.user_for("home", "h-bob") == bob
            canonical = await ledger.canonical(alice, item)
            assert canonical is not None
            assert canonical.data.favorite is True
            assert await ledger.canonical(bob, item) is None
            row = await ledger.get_row("cabin", alice, item)
            assert row is not None
            assert row.desired.favorite is True
            assert await ledger.get_row("cabin", bob, item) is None
    assert "map:0 -> map:cabin=alicia,home=alice" in caplog.text
    assert "map:1 -> map:cabin=robert,home=bob" in caplog.text
