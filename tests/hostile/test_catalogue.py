"""Every catalogued bad input gets one line naming where and the fix, exit 2, no secret.

The whole catalogue (:mod:`tests.hostile.catalogue`) runs in-process through
``jfsync.cli.main(["check", "--offline", ...])``; the cases marked ``subprocess`` also run
through the installed CLI in a child process, as ``jfsync check --offline`` and as
``jfsync run`` (which must refuse them before it contacts any server or opens the ledger).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jfsync import cli
from tests.hostile.catalogue import CASES, CONFIG, SECRETS, Case

pytestmark = pytest.mark.timeout(60)

IS_ROOT = os.geteuid() == 0


def prepare(case: Case, root: Path) -> Path:
    """Write the case's config (and files) into ``root``; return the config path."""
    path = root / CONFIG
    if isinstance(case.text, bytes):
        path.write_bytes(case.text)
    elif case.text is not None:
        path.write_text(case.text, encoding="utf-8")
    if case.setup is not None:
        case.setup(root)
    return path


def assert_one_clear_line(case: Case, code: int, out: str, err: str) -> str:
    """The answer is exit 2 and one line on stderr naming where and the fix, nothing secret."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{case.name}: exit {code}; stderr: {err!r}"
    assert "Traceback" not in err + out, f"{case.name}: traceback: {err}"
    assert len(lines) == 1, f"{case.name}: expected one line, got {lines}"
    line = lines[0]
    assert case.where in line, f"{case.name}: {case.where!r} not named in {line!r}"
    assert case.fix in line, f"{case.name}: fix {case.fix!r} not in {line!r}"
    for secret in SECRETS:
        assert secret not in out + err, f"{case.name}: a secret leaked: {line!r}"
    return line


def skip_if_root(case: Case) -> None:
    if case.needs_non_root and IS_ROOT:
        pytest.skip("root may write anywhere; this input is only bad for other users")


def test_the_catalogue_is_large() -> None:
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names)
    runs = sum(len(c.subprocess) for c in CASES)
    print(f"\nbad-input catalogue: {len(CASES)} cases, {runs} runs of the real CLI")
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_check_offline_answers_one_line(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    skip_if_root(case)
    monkeypatch.delenv("JFSYNC_TEST_UNSET_KEY", raising=False)
    path = prepare(case, tmp_path)
    before = _snapshot(tmp_path)
    code = cli.main(["check", "--offline", "--config", str(path)])
    captured = capsys.readouterr()
    line = assert_one_clear_line(case, code, captured.out, captured.err)
    # The file or the key path is named, and nothing was created or changed on the way.
    assert CONFIG in line or case.where in line
    assert _snapshot(tmp_path) == before, f"{case.name}: check --offline changed files"


SUBPROCESS_RUNS = [(c, command) for c in CASES for command in c.subprocess]


@pytest.mark.parametrize(
    ("case", "command"), SUBPROCESS_RUNS, ids=[f"{c.name}-{cmd}" for c, cmd in SUBPROCESS_RUNS]
)
def test_real_cli_answers_one_line(case: Case, command: str, tmp_path: Path) -> None:
    skip_if_root(case)
    path = prepare(case, tmp_path)
    args = ["check", "--offline"] if command == "check" else ["run"]
    env = {k: v for k, v in os.environ.items() if k != "JFSYNC_TEST_UNSET_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "jfsync", *args, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert_one_clear_line(case, result.returncode, result.stdout, result.stderr)
    # Refused before anything was opened: no ledger lock file appeared.
    assert not list(tmp_path.glob("*.lock")), f"{case.name}: the ledger lock was taken"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return found
