"""User matching across servers: by name (case-insensitive), explicit map, exclude, partial."""

from __future__ import annotations

import hashlib
from typing import Any

from jfsync.config import Config, parse_config
from jfsync.jellyfin.wire import UserDto
from jfsync.sync.users import match_users


def _config(users: str = "", servers: tuple[str, ...] = ("home", "cabin", "lake")) -> Config:
    text = "servers:\n" + "".join(
        f"  - {{name: {s}, url: 'http://127.0.0.1:{8000 + i}', api_key: k{i}}}\n"
        for i, s in enumerate(servers)
    )
    return parse_config(text + users)


def _user(name: str, server: str, **policy: Any) -> UserDto:
    uid = hashlib.md5(f"{server}/{name}".encode(), usedforsecurity=False).hexdigest()
    pol = {"IsAdministrator": False, "IsDisabled": False, **policy}
    return UserDto.model_validate({"Name": name, "Id": uid, "Policy": pol})


def _names(match: Any) -> dict[str, dict[str, str]]:
    return {u.display_name: {s: a.name for s, a in u.accounts.items()} for u in match.users}


def test_names_match_case_insensitively_in_config_order() -> None:
    match = match_users(
        _config(),
        {
            "home": [_user("Alice", "home"), _user("bob", "home")],
            "cabin": [_user("BOB", "cabin"), _user("alice", "cabin")],
            "lake": [_user("ALICE", "lake")],
        },
    )
    assert _names(match) == {
        "Alice": {"home": "Alice", "cabin": "alice", "lake": "ALICE"},
        "bob": {"home": "bob", "cabin": "BOB"},
    }
    alice = match.users[0]
    assert alice.user_id("cabin") == _user("alice", "cabin").id
    assert alice.user_id("nowhere") is None
    assert match.unmatched == {}
    assert match.problems == ()


def test_user_on_one_server_only_is_reported_not_synced() -> None:
    match = match_users(
        _config(),
        {
            "home": [_user("alice", "home"), _user("dave", "home")],
            "cabin": [_user("alice", "cabin")],
            "lake": [_user("erin", "lake")],
        },
    )
    assert _names(match) == {"alice": {"home": "alice", "cabin": "alice"}}
    assert match.unmatched == {"home": ("dave",), "lake": ("erin",)}
    assert [a.name for _, a in match.for_server("cabin")] == ["alice"]
    assert match.for_server("lake") == []


def test_exclude_and_disabled_are_never_touched() -> None:
    config = _config("users:\n  exclude: [Guest]\n")
    match = match_users(
        config,
        {
            "home": [_user("guest", "home"), _user("alice", "home"), _user("old", "home")],
            "cabin": [
                _user("GUEST", "cabin"),
                _user("alice", "cabin", IsDisabled=True),
                _user("old", "cabin", IsDisabled=True),
            ],
            "lake": [_user("alice", "lake")],
        },
    )
    assert _names(match) == {"alice": {"home": "alice", "lake": "alice"}}
    assert match.excluded == {"home": ("guest",), "cabin": ("GUEST",)}
    assert match.disabled == {"cabin": ("alice", "old")}
    assert match.unmatched == {"home": ("old",)}


def test_map_pairs_different_names_and_name_matching_does_the_rest() -> None:
    config = _config(
        "users:\n  map:\n    - {home: alice, cabin: ally}\n    - {home: Bob, lake: robert}\n"
    )
    match = match_users(
        config,
        {
            "home": [_user("alice", "home"), _user("bob", "home"), _user("carol", "home")],
            "cabin": [_user("ally", "cabin"), _user("alice", "cabin"), _user("Carol", "cabin")],
            "lake": [_user("robert", "lake"), _user("bob", "lake")],
        },
    )
    assert _names(match) == {
        "alice": {"home": "alice", "cabin": "ally"},
        "bob": {"home": "bob", "lake": "robert"},
        "carol": {"home": "carol", "cabin": "Carol"},
    }
    # An account taken by the map is not matched again by name.
    assert match.unmatched == {"cabin": ("alice",), "lake": ("bob",)}


def test_map_mode_syncs_only_mapped_users_and_reports_bad_entries() -> None:
    config = _config(
        "users:\n  match: map\n  map:\n    - {home: alice, cabin: ally}\n"
        "    - {home: zed, cabin: bob}\n"
    )
    match = match_users(
        config,
        {
            "home": [_user("alice", "home"), _user("bob", "home")],
            "cabin": [_user("ally", "cabin"), _user("bob", "cabin")],
            "lake": [],
        },
    )
    assert _names(match) == {"alice": {"home": "alice", "cabin": "ally"}}
    assert match.unmatched == {"home": ("bob",), "cabin": ("bob",)}
    assert match.problems == (
        "users.map[1]: home: no user named 'zed' there",
        "users.map[1]: only cabin has its account; the entry syncs nothing",
    )


def test_only_reachable_servers_are_matched() -> None:
    match = match_users(
        _config(),
        {"home": [_user("alice", "home")], "lake": [_user("Alice", "lake")]},
    )
    assert _names(match) == {"alice": {"home": "alice", "lake": "Alice"}}


def test_names_differing_only_by_case_on_one_server_are_a_problem() -> None:
    match = match_users(
        _config(),
        {
            "home": [_user("sam", "home"), _user("Sam", "home")],
            "cabin": [_user("sam", "cabin")],
            "lake": [],
        },
    )
    assert match.problems == (
        "server home: two accounts named 'sam' and 'Sam' differ only by case; name them in "
        "users.map",
    )
    assert _names(match) == {"sam": {"home": "sam", "cabin": "sam"}}
