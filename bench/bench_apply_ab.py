"""The 10k-entry apply of today's code against the code the goal was set on, side by side.

Issue 13 asks for "the 10k-entry message applied at least 3x faster than today", and "today"
was a figure (0.47 s) measured on this machine on the day the issue was filed. Machines drift:
the same code measured hours apart on this shared 2-core machine moved by 1.3-1.6x. So this
bench measures both versions in the same minutes: it extracts the baseline commit's ``jfsync``
and ``bench`` (``git archive``) into a temporary directory and runs each version's own
``bench/bench_pusher.py`` (the figure the goal was measured with: one ``apply_observations``
of 10,000 observations from a, on a new ledger, then again after the pusher delivered the
first) in a fresh process, alternating which goes first, ``--rounds`` times. Printed: each
round's figures (the median of the repetitions of one run, as ``run_all.py`` takes them), the
median per version and the ratio (the goal is 3x). Needs the git history (a clone).

Run from the repository root::

    .venv/bin/python bench/bench_apply_ab.py                 # baseline b7f88f7, 5 rounds
    .venv/bin/python bench/bench_apply_ab.py --rounds 9 --baseline <commit>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import RESULTS_ENV, emit  # noqa: E402

#: The commit whose code the issue's "today" was measured on (bench/run_all.py's baselines
#: were recorded at it).
BASELINE_COMMIT = "b7f88f7"


def extract(commit: str, into: Path) -> None:
    """Write ``commit``'s ``jfsync`` package and ``bench`` folder under ``into``."""
    archive = into / "baseline.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "jfsync", "bench"],
            stdout=out,
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")


def side_by_side(
    bench: str, baseline: str, rounds: int, measure: Callable[[str, Path], str]
) -> None:
    """Extract ``baseline``'s code, then run ``rounds`` rounds of ``measure(side, path)`` for
    "today" (this checkout) and "baseline" in turn, alternating which goes first, and print
    each round's line (what ``measure`` returned for each side). Exit with the fix when the
    commit cannot be read."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        try:
            extract(baseline, base)
        except (OSError, subprocess.CalledProcessError):
            sys.exit(
                f"{bench}: cannot read commit {baseline} from {ROOT}: this needs a git clone "
                "with its history (not a shallow clone or an archive), or --baseline"
            )
        for n in range(rounds):
            order = ("today", "baseline") if n % 2 == 0 else ("baseline", "today")
            line = [measure(side, ROOT if side == "today" else base) for side in order]
            print(f"[{n + 1}] " + "; ".join(line), flush=True)


def figures_of(bench: str, tree: Path, script: Path, args: list[str]) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a fresh process, its ``jfsync`` taken from ``tree``;
    the figures it handed in under ``bench`` (``results.py``)."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as results:
        env = dict(os.environ, PYTHONPATH=str(tree), **{RESULTS_ENV: results.name})
        subprocess.run(
            [sys.executable, str(script), *args],
            env=env,
            cwd=tree,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        lines = [json.loads(line) for line in Path(results.name).read_text().splitlines()]
    (record,) = [r for r in lines if r.get("bench") == bench]
    return record


def run_one(path: Path, rows: int, repeat: int) -> float:
    """Run ``path``'s ``bench/bench_pusher.py`` in a fresh process; its median apply time."""
    script = path / "bench" / "bench_pusher.py"
    record = figures_of("pusher", path, script, ["--rows", str(rows), "--repeat", str(repeat)])
    return float(statistics.median(record["apply_s"]))


def main() -> None:
    """Parse the arguments; run the rounds; print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE_COMMIT, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2, help="applies per run (run_all --quick)")
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"today": [], "baseline": []}

    def measure(side: str, path: Path) -> str:
        seconds = run_one(path, args.rows, args.repeat)
        figures[side].append(seconds)
        return f"{side} {seconds:.3f} s"

    side_by_side("bench_apply_ab", args.baseline, args.rounds, measure)
    today = statistics.median(figures["today"])
    baseline = statistics.median(figures["baseline"])
    print(
        f"{args.rows:,} observations applied: today {today:.3f} s, baseline {args.baseline} "
        f"{baseline:.3f} s: {baseline / today:.2f}x faster (goal >= 3x)"
    )
    emit(
        "apply_ab",
        rows=args.rows,
        rounds=args.rounds,
        baseline=args.baseline,
        today_s=figures["today"],
        baseline_s=figures["baseline"],
    )


if __name__ == "__main__":
    main()
