"""Time the published eager RecNeXt backbones against recnext's inference fast path on CPU, and check the 1.5x goal.

Run: .venv/bin/python benchmarks/latency.py [--models m3 a3] [--input 512x512] [--rounds 20] [--threads 1] [--compile]

All variants live in one process and are timed in turns (one call of each per round), so a neighbour's job that
slows the machine down slows every variant alike. The speed-up is the median over rounds of baseline time / fast
time within the same round. Outputs must equal the baseline's within 1e-4 relative (max |diff| / max |baseline|).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
from torch import nn

from recnext_cli.bench import latency_stats, parse_input_size, random_backbone, time_calls
from recnext_cli.fastpath import prepare_for_inference, prepare_input

GOAL_SPEEDUP = 1.5
TOLERANCE = 1e-4
FAST_PATH = "fused + channels-last"


def variants(model: nn.Module, images: torch.Tensor, with_compile: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Each timed variant with the input it runs on: the published model first, the fast path, and steps towards it."""
    settings = {"fused": dict(fused=True), FAST_PATH: dict(fused=True, channels_last=True)}
    if with_compile:
        settings["compiled " + FAST_PATH] = dict(fused=True, channels_last=True, compile=True)
    runs = {"published (eager, unfused, NCHW)": (model, images)}
    for label, kwargs in settings.items():
        fast = prepare_for_inference(copy.deepcopy(model), device="cpu", **kwargs)
        runs[label] = (fast, prepare_input(images, channels_last=kwargs.get("channels_last", False)))
    return runs


def relative_error(outputs, references) -> float:
    return max(((out - ref).abs().max() / ref.abs().max()).item() for out, ref in zip(outputs, references))


def bench_model(name: str, size: tuple[int, int], rounds: int, warmup: int, with_compile: bool) -> bool:
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    runs = variants(random_backbone(name), images, with_compile)
    (baseline_label, (baseline, baseline_input)), *_ = runs.items()
    equal = True
    with torch.inference_mode():
        expected = baseline(baseline_input)
        for label, (model, x) in runs.items():
            error = relative_error(model(x), expected)
            equal &= error <= TOLERANCE
            print(f"  {label:<40} max relative difference to published: {error:.1e}")
            time_calls(lambda: model(x), warmup=warmup, iters=0)
        times: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(rounds):
            for label, (model, x) in runs.items():
                times[label] += time_calls(lambda: model(x), warmup=0, iters=1)
    baseline_times = times[baseline_label]
    for label, durations in times.items():
        stats = latency_stats(durations)
        speedup = statistics.median(b / d for b, d in zip(baseline_times, durations))
        ratio_of_medians = statistics.median(baseline_times) / statistics.median(durations)
        print(
            f"  {label:<40} median {stats.median_ms:7.1f} ms  p10 {stats.p10_ms:7.1f}  p90 {stats.p90_ms:7.1f}"
            f"  speed-up {speedup:4.2f}x (ratio of medians {ratio_of_medians:4.2f}x)"
        )
    fast_speedup = statistics.median(b / d for b, d in zip(baseline_times, times[FAST_PATH]))
    verdict = "meets" if fast_speedup >= GOAL_SPEEDUP and equal else "MISSES"
    outputs = "equal" if equal else "DIFFER"
    print(f"  goal: fast path >= {GOAL_SPEEDUP}x with equal outputs -> {verdict} ({fast_speedup:.2f}x, {outputs} outputs)")
    return equal and fast_speedup >= GOAL_SPEEDUP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["m3", "a3"])
    parser.add_argument("--input", default="512x512", help="height x width")
    parser.add_argument("--rounds", type=int, default=20, help="timed calls of each variant, taken in turns")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--compile", action="store_true", help="also time the torch.compile'd fast path (compiling takes minutes)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = parse_input_size(args.input)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) on {os.cpu_count()} CPU(s), load average "
        f"{os.getloadavg()[0]:.1f}; input 1x3x{size[0]}x{size[1]} fp32; {args.rounds} rounds"
    )
    met = True
    for name in args.models:
        print(f"RecNeXt-{name.upper()}")
        met &= bench_model(name, size, args.rounds, args.warmup, args.compile)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
