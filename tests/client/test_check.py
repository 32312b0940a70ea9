"""``jfsync check`` against emulators: a readable report, exit 0 when run would work, else 1."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from jfsync.cli import main
from jfsync.emulator import Emulator
from tests.client.conftest import API_KEY, SECRETS, MakeEmulator

pytestmark = pytest.mark.timeout(30)

OTHER_KEY = "abcdefabcdefabcdefabcdefabcdef01"


def _yaml(tmp_path: Path, *servers: tuple[str, str, str], extra: str = "") -> Path:
    lines = ["servers:"]
    for name, url, key in servers:
        lines += [f"  - name: {name}", f"    url: {url}", f"    api_key: {key}"]
    path = tmp_path / "jfsync.yaml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


async def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = await asyncio.to_thread(main, ["check", "--config", str(path)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    for secret in [*SECRETS, OTHER_KEY]:
        assert secret not in output, "a secret was printed"
    return status, output


async def test_two_good_servers_pass_with_a_readable_report(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = await make_emulator(server_name="home-emu", server_version="10.10.7")
    cabin = await make_emulator(
        server_name="cabin-emu",
        server_version="10.11.11",
        path_root="/mnt/media",
        api_key=OTHER_KEY,
        users=[("Alice", "a-pw-x"), ("bob", "b-pw-x"), ("erin", "e-pw-x")],
    )
    path = _yaml(
        tmp_path,
        ("home", home.url, API_KEY),
        ("cabin", cabin.url, OTHER_KEY),
    )
    status, out = await _check(path, capsys)
    assert status == 0, out
    assert f'Server home ({home.url}): Jellyfin 10.10.7, "home-emu", id {home.server_id}' in out
    assert f'Server cabin ({cabin.url}): Jellyfin 10.11.11, "cabin-emu"' in out
    assert out.count("API key: valid, administrator") == 2
    assert out.count("Quick Connect: enabled") == 2
    assert "  alice: home: alice [Quick Connect], cabin: Alice [Quick Connect]" in out
    assert "  bob: home: bob [Quick Connect], cabin: bob [Quick Connect]" in out
    assert "home, only here, not synced: Carol" in out
    assert "cabin, only here, not synced: erin" in out
    assert "OK: 2 user(s) sync across 2 servers." in out


async def test_10_8_server_fails_with_the_upgrade_message(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = await make_emulator()
    old = await make_emulator(server_version="10.8.13")
    status, out = await _check(
        _yaml(tmp_path, ("new", new.url, API_KEY), ("old", old.url, API_KEY)), capsys
    )
    assert status == 1
    assert (
        "  - old: Jellyfin 10.8.13 has no user-data write route; jfsync needs 10.9 or newer. "
        "Upgrade the server."
    ) in out
    assert "no user exists on two servers" in out


async def test_bad_key_fails_and_names_the_config_key(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = await make_emulator()
    two = await make_emulator()
    status, out = await _check(
        _yaml(tmp_path, ("one", one.url, API_KEY), ("two", two.url, OTHER_KEY)), capsys
    )
    assert status == 1
    assert "API key: rejected (HTTP 401)" in out
    assert "two: the API key was rejected" in out
    assert "servers[1].api_key" in out


async def test_unreachable_server_fails(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    up = await make_emulator()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, out = await _check(
        _yaml(tmp_path, ("up", up.url, API_KEY), ("down", f"http://127.0.0.1:{port}", API_KEY)),
        capsys,
    )
    assert status == 1
    assert f"Server down (http://127.0.0.1:{port}): not reachable" in out
    assert "down: cannot reach the server: GET /System/Info/Public: cannot reach" in out


async def test_quick_connect_disabled_without_credentials_fails_and_password_fixes_it(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = await make_emulator()
    cabin = await make_emulator(quick_connect=False)
    path = _yaml(
        tmp_path,
        ("home", home.url, API_KEY),
        ("cabin", cabin.url, API_KEY),
        extra="users:\n  exclude: [carol]\n",
    )
    status, out = await _check(path, capsys)
    assert status == 1
    assert "Quick Connect: disabled" in out
    assert (
        "cabin: no way to get a token for user alice: Quick Connect is disabled; enable Quick "
        "Connect or set servers[1].users.alice.token or servers[1].users.alice.password"
    ) in out
    assert "home, excluded: Carol" in out

    bob_token = cabin.user_token("bob")
    text = path.read_text(encoding="utf-8").replace(
        f"    api_key: {API_KEY}\nusers:",
        f"    api_key: {API_KEY}\n    users:\n"
        f"      alice: {{password: alice-pw-1}}\n      bob: {{token: {bob_token}}}\nusers:",
    )
    path.write_text(text, encoding="utf-8")
    status, out = await _check(path, capsys)
    assert status == 0, out
    assert bob_token not in out
    assert "cabin: alice [configured password]" in out
    assert "cabin: bob [configured token, valid]" in out


async def test_configured_token_of_the_wrong_user_fails(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = await make_emulator()
    cabin: Emulator = await make_emulator()
    path = _yaml(tmp_path, ("home", home.url, API_KEY), ("cabin", cabin.url, API_KEY))
    wrong = cabin.user_token("bob")
    text = path.read_text(encoding="utf-8") + (f"    users:\n      alice: {{token: {wrong}}}\n")
    path.write_text(text, encoding="utf-8")
    status, out = await _check(path, capsys)
    assert wrong not in out
    assert status == 1
    assert "cabin: servers[1].users.alice.token belongs to bob" in out


def _filtered_yaml(tmp_path: Path, home: str, cabin: str, include: str) -> Path:
    path = tmp_path / "jfsync.yaml"
    path.write_text(
        "servers:\n"
        f"  - name: home\n    url: {home}\n    api_key: {API_KEY}\n"
        f"    libraries:\n      include: [{include}]\n"
        f"  - name: cabin\n    url: {cabin}\n    api_key: {API_KEY}\n    mode: receive\n",
        encoding="utf-8",
    )
    return path


async def test_report_says_each_servers_direction_and_which_libraries_sync(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The user syncs only home's films, and the cabin only receives; they misspelt a library.
    home = await make_emulator()
    cabin = await make_emulator()
    status, out = await _check(
        _filtered_yaml(tmp_path, home.url, cabin.url, "movies, Cartons"), capsys
    )
    assert status == 0, out
    home_part, cabin_part = out.split(f"Server cabin ({cabin.url})")
    assert "  mode: both (sends its users' changes and receives the others')" in home_part
    assert "  libraries: syncing Movies; left out: Shows" in home_part
    assert (
        "  warning: servers[0].libraries names Cartons, which this server does not have "
        "(it has Movies, Shows); check the spelling"
    ) in home_part
    assert "  mode: receive (gets the others' changes; its own stay on it)" in cabin_part
    assert "  libraries: all (no filter)" in cabin_part


async def test_a_library_filter_that_leaves_nothing_in_fails_the_check(
    make_emulator: MakeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = await make_emulator()
    cabin = await make_emulator()
    status, out = await _check(_filtered_yaml(tmp_path, home.url, cabin.url, "Cartons"), capsys)
    assert status == 1, out
    assert "  libraries: syncing none; left out: Movies, Shows" in out
    assert (
        "  - home: servers[0].libraries leaves none of its libraries in, so nothing of it "
        "would sync; fix the names (the server's libraries are listed above)"
    ) in out
