"""Time `recnext --help` as a whole process against a bare `python -c pass`, and check the 0.3 s goal.

Run: .venv/bin/python benchmarks/startup.py [--runs 15] [--out benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_SECONDS = 0.3


def wall_times(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache once
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the raw results here as JSON")
    args = parser.parse_args()
    recnext = str(Path(sys.executable).with_name("recnext"))
    baseline = statistics.median(wall_times([sys.executable, "-c", "pass"], args.runs))
    commands = {"recnext --help": [recnext, "--help"], "recnext --version": [recnext, "--version"]}
    print(f"python -c pass           median {baseline * 1000:7.1f} ms  (baseline)")
    worst = 0.0
    medians = {}
    for label, cmd in commands.items():
        median = medians[label] = statistics.median(wall_times(cmd, args.runs))
        worst = max(worst, median)
        print(f"{label:<24} median {median * 1000:7.1f} ms  ratio {median / baseline:5.2f}x baseline")
    verdict = "meets" if worst < GOAL_SECONDS else "MISSES"
    print(f"goal: whole process under {GOAL_SECONDS * 1000:.0f} ms -> {verdict} ({worst * 1000:.0f} ms)")
    if args.out:
        # Imported only here: the timed commands must not find anything of recnext already loaded.
        from recnext_cli.bench import machine_info, write_result

        write_result(args.out, {"benchmark": "startup", "runs": args.runs, "machine": machine_info(),
                                "python_c_pass_s": baseline, "median_s": medians, "goal_s": GOAL_SECONDS,
                                "goal_met": worst < GOAL_SECONDS})


if __name__ == "__main__":
    main()
