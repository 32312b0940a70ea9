"""``jfsync init``: a first config from questions or flags, checked against two emulators.

The operator answers on stdin (fed here as text) or gives flags; the command checks the servers
as ``jfsync check`` does, lists who would sync, and writes a commented file that ``jfsync run``
accepts. Keys are never printed, an existing file is never overwritten without ``--force``.
"""

from __future__ import annotations

import io
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jfsync.cli import build_parser
from jfsync.config import load_config
from jfsync.emulator import Emulator
from jfsync.ops.initcmd import EXIT_CHECK, EXIT_OK, EXIT_USAGE, init_config
from tests.operate.conftest import KEYS

pytestmark = pytest.mark.timeout(30)


async def _init(
    argv: list[str], answers: str = "", environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    args = build_parser().parse_args(["init", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = await init_config(
        args,
        stdin=io.StringIO(answers),
        out=out,
        err=err,
        environ=environ or {},
        now=lambda: datetime(2026, 12, 6, 12, 0, tzinfo=UTC),
    )
    return code, out.getvalue(), err.getvalue()


async def test_questions_answered_on_stdin_give_a_config_jfsync_accepts(
    emulators: dict[str, Emulator], tmp_path: Path
) -> None:
    home, cabin = emulators["home"], emulators["cabin"]
    target = tmp_path / "jfsync.yaml"
    answers = "\n".join(
        [
            home.url,
            KEYS["home"],
            "",  # the name the server announces is offered; take it
            cabin.url,
            KEYS["cabin"],
            "lake",  # or give another
            "n",  # no third server
        ]
    )
    code, out, err = await _init(["-o", str(target)], answers + "\n")
    assert code == EXIT_OK, err
    config = load_config(target)
    assert [s.name for s in config.servers] == ["home", "lake"]
    assert [s.url for s in config.servers] == [home.url, cabin.url]
    text = target.read_text()
    # Commented: who would sync, each server's libraries, the knobs left at their defaults.
    assert "#   alice (home: alice, lake: alice)" in text
    assert "# its libraries: Movies, Shows" in text
    assert "# choices:" in text
    assert "mode: both" in text
    # The check ran (as jfsync check) and said so; the keys were never printed.
    assert "API key: valid, administrator" in out
    assert "OK: 2 user(s) sync across 2 servers." in out
    assert KEYS["home"] not in out + err
    assert KEYS["cabin"] not in out + err
    # It holds keys: readable by its owner only.
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


async def test_flags_with_keys_as_environment_references(
    emulators: dict[str, Emulator], tmp_path: Path
) -> None:
    home, cabin = emulators["home"], emulators["cabin"]
    target = tmp_path / "jfsync.yaml"
    code, out, err = await _init(
        [
            "--no-input",
            "-o",
            str(target),
            "--server",
            f"home={home.url}",
            "--server",
            f"cabin={cabin.url}",
            "--api-key",
            "home=${HOME_KEY}",
            "--api-key",
            f"cabin={KEYS['cabin']}",
            "--keys-as-env",
        ],
        environ={"HOME_KEY": KEYS["home"]},
    )
    assert code == EXIT_OK, err
    text = target.read_text()
    assert KEYS["home"] not in text
    assert KEYS["cabin"] not in text
    assert 'api_key: "${HOME_KEY}"' in text
    assert 'api_key: "${JFSYNC_CABIN_API_KEY}"' in text
    assert "set HOME_KEY, JFSYNC_CABIN_API_KEY to the API keys in its environment" in out
    config = load_config(
        target, environ={"HOME_KEY": KEYS["home"], "JFSYNC_CABIN_API_KEY": KEYS["cabin"]}
    )
    assert [s.name for s in config.servers] == ["home", "cabin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # no key in it


async def test_an_existing_file_is_kept_without_force(
    emulators: dict[str, Emulator], tmp_path: Path
) -> None:
    home, cabin = emulators["home"], emulators["cabin"]
    target = tmp_path / "jfsync.yaml"
    target.write_text("# mine\n")
    flags = [
        "--no-input",
        "-o",
        str(target),
        "--server",
        f"home={home.url}",
        "--server",
        f"cabin={cabin.url}",
        "--api-key",
        f"home={KEYS['home']}",
        "--api-key",
        f"cabin={KEYS['cabin']}",
    ]
    code, _, err = await _init(flags)
    assert code == EXIT_USAGE
    assert "exists; not overwritten (give --force" in err
    assert target.read_text() == "# mine\n"
    code, _, err = await _init([*flags, "--force"])
    assert code == EXIT_OK, err
    assert load_config(target).servers[0].name == "home"


async def test_a_refused_key_writes_nothing_unless_asked(
    emulators: dict[str, Emulator], tmp_path: Path
) -> None:
    home, cabin = emulators["home"], emulators["cabin"]
    target = tmp_path / "jfsync.yaml"
    wrong = "00000000000000000000000000000000"
    flags = [
        "--no-input",
        "-o",
        str(target),
        "--server",
        f"home={home.url}",
        "--server",
        f"cabin={cabin.url}",
        "--api-key",
        f"home={KEYS['home']}",
        "--api-key",
        f"cabin={wrong}",
    ]
    code, out, err = await _init(flags)
    assert code == EXIT_CHECK
    assert "cabin: the API key was rejected" in out
    assert "not written" in err
    assert not target.exists()
    assert wrong not in out + err
    code, _, err = await _init([*flags, "--no-check"])
    assert code == EXIT_OK, err
    assert target.exists()


async def test_missing_answers_and_bad_flags_are_said_plainly(tmp_path: Path) -> None:
    target = tmp_path / "jfsync.yaml"
    code, _, err = await _init(["--no-input", "-o", str(target)])
    assert code == EXIT_USAGE
    assert "give at least two --server NAME=URL" in err
    code, _, err = await _init(["-o", str(target)], "http://127.0.0.1:9\n")  # input ends
    assert code == EXIT_USAGE
    assert "input ended" in err
    code, _, err = await _init(["--no-input", "-o", str(target), "--server", "nourl"])
    assert code == EXIT_USAGE
    assert "expected NAME=VALUE" in err
    code, _, err = await _init(
        [
            "--no-input",
            "-o",
            str(target),
            "--server",
            "a=http://127.0.0.1:9",
            "--server",
            "b=http://127.0.0.1:9",
            "--api-key",
            "a=${NOT_SET}",
            "--api-key",
            "b=k",
        ]
    )
    assert code == EXIT_USAGE
    assert "environment variable NOT_SET is not set" in err
    assert not target.exists()
