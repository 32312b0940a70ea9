"""Read the tables of docs/status.md, so tests check the service against what is documented."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "status.md"


def table_rows(section: str) -> list[list[str]]:
    """Return the body rows of the first table under the ``## {section}`` heading."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/status.md has no section {section!r}"
    rows: list[list[str]] = []
    for line in match.group(1).splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if set("".join(cells)) <= set("-: "):
            continue
        rows.append(cells)
    return rows[1:]  # the first row is the header


def status_keys() -> dict[str, set[str]]:
    """Documented /status key paths -> the JSON types allowed there."""
    return {
        row[0].strip("`"): {t.strip() for t in row[1].split("|")} for row in table_rows("`/status`")
    }


def metric_rows() -> dict[str, tuple[str, list[str]]]:
    """Documented metric name -> (type, label names)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for row in table_rows("`/metrics`"):
        labels = [label.strip().strip("`") for label in row[2].split(",") if label.strip()]
        found[row[0].strip("`")] = (row[1], labels)
    return found
