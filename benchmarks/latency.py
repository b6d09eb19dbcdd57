"""Time `recnext bench latency`'s default fast path against the published eager backbone on CPU; check the 1.5x goal.

Run: .venv/bin/python benchmarks/latency.py [--models m3 a3] [--input 512x512] [--rounds 15] [--threads 1]
     [--bf16] [--out benchmarks/results/latency-1t.json]

Each variant is built by `recnext_cli.bench.build_runner`, exactly as `recnext bench latency` builds it: the
published model is `--no-fused`, the fast path is the default, `--bf16` adds `--dtype bf16` where the CPU has it.
All variants live in one process and are timed in turns (one call of each per round), so a neighbour's job that
slows the machine down slows every variant alike. A speed-up is the median over rounds of baseline time / variant
time within the same round. fp32 outputs must equal the published model's within 1e-4 relative (max |diff| / max
|published|); bf16 reports its difference. Exit code 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from recnext_cli.bench import (
    BenchConfig,
    build_runner,
    latency_stats,
    machine_info,
    parse_input_size,
    speedup_in_turns,
    time_in_turns,
    torch_threads,
    write_result,
)

GOAL_SPEEDUP = 1.5
GOAL_BF16_OVER_FP32 = 1.5
TOLERANCE = 1e-4
PUBLISHED = "published (--no-fused)"
FAST_PATH = "fast path (default)"
BF16 = "fast path --dtype bf16"


def relative_error(outputs, references) -> float:
    return max(((out.float() - ref).abs().max() / ref.abs().max()).item() for out, ref in zip(outputs, references))


def bench_model(name: str, base: BenchConfig, rounds: int, with_bf16: bool) -> dict:
    """Time the variants of model `name` in turns; a record of their statistics, speed-ups and output differences."""
    configs = {PUBLISHED: dataclasses.replace(base, fused=False), FAST_PATH: base}
    if with_bf16:
        configs[BF16] = dataclasses.replace(base, dtype="bf16")
    runners = {label: build_runner(name, config) for label, config in configs.items()}
    with torch.inference_mode():
        expected = runners[PUBLISHED].run()
        errors = {label: relative_error(runner.run(), expected) for label, runner in runners.items()}
        times = time_in_turns({label: runner.run for label, runner in runners.items()}, warmup=base.warmup,
                              rounds=rounds)
    variants = {}
    for label, durations in times.items():
        stats = latency_stats(durations)
        variants[label] = {
            "fast_path": runners[label].fast_path.describe(),
            "dtype": configs[label].dtype,
            "median_ms": stats.median_ms,
            "p10_ms": stats.p10_ms,
            "p90_ms": stats.p90_ms,
            "speedup": speedup_in_turns(times[PUBLISHED], durations),
            "max_relative_difference": errors[label],
        }
    record = {"model": name, "variants": variants}
    record["fp32_outputs_equal"] = errors[FAST_PATH] <= TOLERANCE
    record["goal_met"] = record["fp32_outputs_equal"] and variants[FAST_PATH]["speedup"] >= GOAL_SPEEDUP
    if with_bf16:
        bf16_over_fp32 = speedup_in_turns(times[FAST_PATH], times[BF16])
        record["bf16_over_fp32"] = bf16_over_fp32
        record["bf16_goal_met"] = bf16_over_fp32 >= GOAL_BF16_OVER_FP32
    return record


def report(record: dict) -> str:
    lines = [f"RecNeXt-{record['model'].upper()}"]
    for label, variant in record["variants"].items():
        lines.append(
            f"  {label:<24} median {variant['median_ms']:7.1f} ms  p10 {variant['p10_ms']:7.1f}  "
            f"p90 {variant['p90_ms']:7.1f}  speed-up {variant['speedup']:4.2f}x  "
            f"max rel. diff {variant['max_relative_difference']:.1e}"
        )
    fast = record["variants"][FAST_PATH]
    verdict = "meets" if record["goal_met"] else "MISSES"
    outputs = "equal" if record["fp32_outputs_equal"] else "DIFFER"
    lines.append(f"  fast path: {fast['fast_path']}")
    lines.append(
        f"  goal: fast path >= {GOAL_SPEEDUP}x with equal outputs -> {verdict} ({fast['speedup']:.2f}x, {outputs})"
    )
    if "bf16_over_fp32" in record:
        verdict = "meets" if record["bf16_goal_met"] else "MISSES"
        ratio = record["bf16_over_fp32"]
        lines.append(f"  goal: bf16 >= {GOAL_BF16_OVER_FP32}x over fp32 fast path -> {verdict} ({ratio:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["m3", "a3"])
    parser.add_argument("--input", default="512x512", help="height x width")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls of each variant, taken in turns")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--bf16", action="store_true", help="also time --dtype bf16 (CPUs with avx512_bf16 or AMX)")
    parser.add_argument("--out", type=Path, help="also write the raw results here as JSON")
    args = parser.parse_args(argv)
    base = BenchConfig(input_size=parse_input_size(args.input), warmup=args.warmup, threads=args.threads)
    before = machine_info(args.threads)
    print(
        f"torch {before['torch']}, {args.threads} thread(s) on {before['cpu_count']} CPU(s), "
        f"load average {before['load_average'][0]:.1f}; input 1x3x{args.input} fp32; {args.rounds} rounds"
    )
    with torch_threads(args.threads):
        records = [bench_model(name, base, args.rounds, args.bf16) for name in args.models]
    for record in records:
        print(report(record))
    after = machine_info(args.threads)
    print(f"load average after: {after['load_average'][0]:.1f}")
    if args.out:
        settings = {"benchmark": "latency", "input": args.input, "rounds": args.rounds, "threads": args.threads}
        write_result(args.out, {**settings, "machine": before, "load_average_after": after["load_average"],
                              "models": records})
    met = all(record["goal_met"] and record.get("bf16_goal_met", True) for record in records)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
