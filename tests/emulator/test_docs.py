"""docs/emulator.md stays true: its route x version table is the emulator's route list."""

from __future__ import annotations

from pathlib import Path

import pytest

from jfsync.emulator.route_table import markdown_table

pytestmark = pytest.mark.timeout(30)

DOC = Path(__file__).resolve().parents[2] / "docs" / "emulator.md"


def test_the_route_table_in_the_docs_is_current() -> None:
    text = DOC.read_text(encoding="utf-8")
    begin, end = "<!-- routes:begin -->\n", "<!-- routes:end -->"
    documented = text[text.index(begin) + len(begin) : text.index(end)]
    assert documented == markdown_table(), (
        "docs/emulator.md is out of date: paste `python -m jfsync.emulator.route_table` "
        "between the routes markers"
    )
    # A few rows read as a third-party author would need them.
    assert "| `GET /Shows/{seriesId}/Episodes` | yes | yes | yes | yes | yes |" in documented
    assert "| `GET /UserItems/Resume` | - | yes | yes | yes | yes |" in documented
    assert "| `GET /Users/{userId}/Items/Latest` | yes | legacy | legacy | legacy | legacy |" in (
        documented
    )
