"""Smoke test of ``bench/run_all.py``: at tiny sizes its ledger, index and reconcile benches
run, hand their figures back and come out as table rows with a figure, a floor measured in the
same run and a verdict (the benchmarks themselves are not tests; this only keeps the
instrument working).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_prints_figures_floors_and_verdicts(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--tiny", "--only", "ledger",
         "index", "reconcile", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )  # fmt: skip
    # 0: every goal judged passes, 1: one fails; 2 would mean a bench gave no figures.
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    assert "start: load" in done.stdout
    assert "end: load" in done.stdout
    rows = {row["figure"]: row for row in json.loads(out.read_text())["rows"]}
    single = rows["single-event apply (one transaction each)"]
    assert single["floor"].startswith("raw sqlite3")
    assert single["ratio"].endswith("x")
    assert single["result"] in ("pass", "FAIL")
    written = rows["bytes written by the index build"]
    assert written["floor"].startswith("ledger")
    assert written["result"] in ("pass", "FAIL")
    refresh = rows["one-item refresh (server a)"]
    assert refresh["measured"].endswith("ms")
    assert rows["worst loop stall: index build"]["result"] in ("pass", "FAIL")
    # Both reconciles are probed: the first, and a second one over written id maps.
    assert rows["worst loop stall: reconcile"]["measured"].endswith("ms")
    assert rows["worst loop stall: second reconcile (dry run)"]["measured"].endswith("ms")
    assert "| figure | size | measured | floor | ratio | goal | result |" in done.stdout
