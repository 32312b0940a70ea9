"""The 10k-entry message's first write with today's code and the baseline's, side by side.

Issue 13 asks for "the 10k-entry message applied at least 3x faster than today"; besides the
ledger-only apply (``bench_apply_ab.py``), ``run_all.py`` judges the time from a bulk action
of 10,000 items on ``a`` to its first write reaching ``b``. Its baseline (0.90 s) was measured
from the start of the bulk action, so it counts ``a``'s own work (saving the changes, building
the 10,757-entry message: an emulator in the bench's process), and one day's machine. Machines
drift, and this one's speed moved by 1.3-1.6x over hours. So this bench runs the same harness
(``bench/bench_replication.py`` of this checkout: its emulators, its bursts) twice per round,
once with this checkout's ``jfsync run`` and once with the baseline commit's (extracted with
``git archive``, run through ``--jfsync-path``), alternating which goes first, and compares
the first write timed from ``a``'s message: the part that is jfsync's on both sides. The
figures from the start of the bulk action and the whole burst are printed beside it.

Run from the repository root (needs the git history, as ``bench_apply_ab.py``)::

    .venv/bin/python bench/bench_burst_ab.py                 # baseline b7f88f7, 3 rounds
    .venv/bin/python bench/bench_burst_ab.py --rounds 5 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_apply_ab import BASELINE_COMMIT, figures_of, side_by_side  # noqa: E402
from results import emit  # noqa: E402

#: The figures kept from each run (lists, one value per burst).
KEPT = ("first_write_s", "told_s", "burst_s")


def run_one(jfsync_path: Path, burst: int, repeat: int) -> dict[str, list[float]]:
    """Run this checkout's ``bench_replication.py`` against ``jfsync_path``'s ``jfsync run``
    in a fresh process; its per-burst figures."""
    args = ["--changes", "20", "--burst", str(burst), "--repeat", str(repeat)]
    script = ROOT / "bench" / "bench_replication.py"
    record = figures_of("replication", ROOT, script, [*args, "--jfsync-path", str(jfsync_path)])
    return {name: [float(x) for x in record[name]] for name in KEPT}


def after_message(run: dict[str, list[float]], name: str) -> list[float]:
    """``name``'s figures timed from a's message instead of the start of the bulk action."""
    return [x - told for x, told in zip(run[name], run["told_s"], strict=True)]


def main() -> None:
    """Parse the arguments; run the rounds; print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE_COMMIT, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=10_000, help="items marked played at once")
    parser.add_argument("--repeat", type=int, default=3, help="bursts per run")
    args = parser.parse_args()
    sides: dict[str, dict[str, list[float]]] = {
        side: {"first_write_s": [], "first_from_message_s": [], "burst_from_message_s": []}
        for side in ("today", "baseline")
    }

    def measure(side: str, path: Path) -> str:
        run = run_one(path, args.burst, args.repeat)
        first = after_message(run, "first_write_s")
        kept = sides[side]
        kept["first_write_s"] += run["first_write_s"]
        kept["first_from_message_s"] += first
        kept["burst_from_message_s"] += after_message(run, "burst_s")
        return (
            f"{side} first write {statistics.median(first):.3f} s after a's message "
            f"({statistics.median(run['first_write_s']):.3f} s after the bulk action)"
        )

    side_by_side("bench_burst_ab", args.baseline, args.rounds, measure)

    def medians(name: str) -> tuple[float, float]:
        return statistics.median(sides["today"][name]), statistics.median(sides["baseline"][name])

    first_today, first_base = medians("first_from_message_s")
    print(
        f"{args.burst:,}-item bulk action, first write after a's message (median of "
        f"{len(sides['today']['first_from_message_s'])} bursts): today {first_today:.3f} s, "
        f"baseline {args.baseline} {first_base:.3f} s: {first_base / first_today:.2f}x faster "
        "(goal >= 3x)"
    )
    action_today, action_base = medians("first_write_s")
    burst_today, burst_base = medians("burst_from_message_s")
    print(
        f"after the bulk action (a's own work included): today {action_today:.3f} s, baseline "
        f"{action_base:.3f} s ({action_base / action_today:.2f}x); whole burst from a's message: "
        f"today {burst_today:.2f} s, baseline {burst_base:.2f} s ({burst_base / burst_today:.2f}x)"
    )
    emit(
        "burst_ab",
        burst=args.burst,
        repeat=args.repeat,
        rounds=args.rounds,
        baseline=args.baseline,
        **{f"{side}_{name}": values for side in sides for name, values in sides[side].items()},
    )


if __name__ == "__main__":
    main()
