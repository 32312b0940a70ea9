"""Hand-off of a bench's figures to ``bench/run_all.py``: one JSON line per result.

A bench calls :func:`emit` with its figures; when it runs under ``run_all.py`` the environment
variable ``JFSYNC_BENCH_RESULTS`` names a file and the figures are appended to it as one JSON
object (``{"bench": ..., ...}``). Run alone, the benches print as before and this does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: The environment variable naming the results file.
RESULTS_ENV = "JFSYNC_BENCH_RESULTS"


def emit(bench: str, **figures: Any) -> None:
    """Append ``figures`` for ``bench`` to the results file, if one is set."""
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return
    with Path(target).open("a") as out:
        out.write(json.dumps({"bench": bench, **figures}) + "\n")


def read(path: Path) -> dict[str, dict[str, Any]]:
    """The results in ``path`` by bench name (a later line for a bench adds to earlier ones)."""
    found: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            found.setdefault(record.pop("bench"), {}).update(record)
    return found
