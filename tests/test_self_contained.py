"""The repository needs nothing beside it: no file reads or points at a ``shared`` folder
outside the checkout (a user's clone has none), and the OpenAPI files the tests check
against are in the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REFERENCE_DIR

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
#: Folders that are not the project's own files.
SKIPPED = {".git", ".venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache"}
OUTSIDE = ("../" + "shared", "shared/" + "reference")


def _project_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        if any(part in SKIPPED or part.endswith(".egg-info") for part in path.parts):
            continue
        if path.is_file() and path.suffix in {".py", ".md", ".toml", ".yaml", ".yml", ""}:
            found.append(path)
    return found


def test_nothing_in_the_repository_points_outside_it() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in _project_files()
        if any(marker in path.read_text(encoding="utf-8", errors="replace") for marker in OUTSIDE)
    ]
    assert offenders == []


def test_the_openapi_files_are_in_the_repository() -> None:
    assert REFERENCE_DIR.is_relative_to(ROOT)
    for version in ("10.8.13", "10.10.7", "10.11.11"):
        spec = REFERENCE_DIR / f"jellyfin-openapi-{version}.json"
        assert spec.stat().st_size > 1_000_000, spec
