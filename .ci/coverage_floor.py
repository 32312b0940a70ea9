"""Refuse a coverage floor lower than the previous commit's: the floor may rise, never fall.

The floor is ``[tool.coverage.report] fail_under`` in pyproject.toml. "Previous" is ``HEAD``
when pyproject.toml has uncommitted changes (a local run before committing), else ``HEAD~1``
(the commit before the one under test; on a merge, its first parent: the branch merged into).
A repository whose first commit is under test has nothing to compare with and passes; a
shallow clone without the previous commit fails, saying to fetch it (``--depth 2`` or more):
a gate that cannot look is not passed silently.

Usage: ``python3 .ci/coverage_floor.py`` from the repository root; exit 1 when refused.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path


def floor_of(text: str) -> float:
    """The ``fail_under`` of a pyproject.toml's text (0 when unset)."""
    report = tomllib.loads(text).get("tool", {}).get("coverage", {}).get("report", {})
    return float(report.get("fail_under", 0))


def git(*args: str) -> subprocess.CompletedProcess[str]:
    """Run git quietly and return the finished process."""
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def main() -> int:
    """Compare the floor here with the previous commit's; print the verdict."""
    current = floor_of(Path("pyproject.toml").read_text(encoding="utf-8"))
    if git("rev-parse", "--git-dir").returncode != 0:
        print("coverage floor: not a git checkout, so no history to compare with", file=sys.stderr)
        return 1
    dirty = git("diff", "--quiet", "HEAD", "--", "pyproject.toml").returncode != 0
    previous = "HEAD" if dirty else "HEAD~1"
    if git("rev-parse", "--verify", "--quiet", previous + "^{commit}").returncode != 0:
        if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
            print(
                f"coverage floor: {previous} is not in this shallow clone; fetch it "
                "(git fetch --deepen=1, or clone with --depth 2 or more)",
                file=sys.stderr,
            )
            return 1
        print(f"coverage floor: {current:g}% (first commit, nothing to compare with)")
        return 0
    shown = git("show", f"{previous}:pyproject.toml")
    before = floor_of(shown.stdout) if shown.returncode == 0 else 0.0
    if current < before:
        print(
            f"coverage floor: fail_under fell from {before:g}% ({previous}) to {current:g}%; "
            "the floor may rise but never fall",
            file=sys.stderr,
        )
        return 1
    print(f"coverage floor: {current:g}% (was {before:g}% at {previous})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
