"""Time a whole Mask R-CNN inference, mmdet's eager model against recnext's fast path on CPU; check equal detections.

Run: .venv/bin/python benchmarks/detector.py [--model m3] [--input 800x1344] [--rounds 5] [--threads 1]
     [--out benchmarks/results/detector.json]

Both detectors are built by `recnext_cli.bench.build_runner` from the published config with the same seeded random
weights, as `recnext bench latency --part detector` builds them (`--no-fused` and the default; `bench.busy_heads`
makes the random heads keep 100 detections, so that the mask head and the paste do a real image's work), and are
timed in turns in one process, the order reversed every other round; the speed-up is the median of per-round
ratios of wall-clock time, and the same ratio of process CPU time is printed beside it (steadier on a busy machine,
but it counts threads that spin while waiting). Detections must be identical: the same boxes per class within 1e-3
pixels and scores within 1e-3, the same masks pixel for pixel. The 800x1344 input is one 800x1333 COCO image padded
to a multiple of 32, as mmdet's test pipeline pads it. Exit code 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recnext_cli.bench import BenchConfig, build_runner, machine_info, parse_input_size, torch_threads, write_result

GOAL_SPEEDUP = 1.3
BOX_TOLERANCE = 1e-3


def detection_difference(results, expected) -> tuple[float, int, int, int]:
    """(largest box or score difference, masks that differ, pixels that differ, detections) between two mmdet
    Mask R-CNN outputs; the difference is infinite when a class has a different number of detections."""
    largest, masks_differ, pixels_differ, detections = 0.0, 0, 0, 0
    for (boxes, masks), (want_boxes, want_masks) in zip(results, expected, strict=True):
        for got, want in zip(boxes, want_boxes, strict=True):
            if got.shape != want.shape:
                return float("inf"), 0, 0, detections
            detections += len(want)
            if len(want):
                largest = max(largest, float(np.abs(got - want).max()))
        for got, want in zip(masks, want_masks, strict=True):
            for mask, want_mask in zip(got, want, strict=True):
                differ = int(np.count_nonzero(mask != want_mask))
                masks_differ += differ > 0
                pixels_differ += differ
    return largest, masks_differ, pixels_differ, detections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m3")
    parser.add_argument("--input", default="800x1344", help="height x width, multiples of 32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the raw results here as JSON")
    args = parser.parse_args(argv)
    config = BenchConfig(part="detector", input_size=parse_input_size(args.input), threads=args.threads)
    machine = machine_info(args.threads)
    print(f"torch {machine['torch']}, {args.threads} thread(s), load average {machine['load_average'][0]:.1f}; "
          f"RecNeXt-{args.model.upper()} Mask R-CNN, 1x3x{args.input} fp32, {args.rounds} rounds")
    labels = ("mmdet eager (--no-fused)", "fast path (default)")
    with torch_threads(args.threads), torch.inference_mode():
        runners = dict(zip(labels, (build_runner(args.model, dataclasses.replace(config, fused=fused), with_flops=False)
                                    for fused in (False, True))))
        outputs = {label: runner.run() for label, runner in runners.items()}  # also the warm-up
        times = {label: [] for label in labels}
        cpu_times = {label: [] for label in labels}
        for round_index in range(args.rounds):
            for label in labels[:: 1 if round_index % 2 == 0 else -1]:
                start, cpu_start = time.perf_counter(), time.process_time()
                runners[label].run()
                times[label].append(time.perf_counter() - start)
                cpu_times[label].append(time.process_time() - cpu_start)
    baseline, fast = labels
    largest, masks_differ, pixels_differ, detections = detection_difference(outputs[fast], outputs[baseline])
    equal = largest <= BOX_TOLERANCE and masks_differ == 0
    speedup = statistics.median(b / f for b, f in zip(times[baseline], times[fast]))
    cpu_speedup = statistics.median(b / f for b, f in zip(cpu_times[baseline], cpu_times[fast]))
    for label in labels:
        print(f"  {label:<26} median {statistics.median(times[label]) * 1000:8.1f} ms "
              f"(CPU time {statistics.median(cpu_times[label]) * 1000:.1f} ms)")
    print(f"  fast path: {runners[fast].fast_path.describe()}")
    print(f"  {detections} detections; largest box/score difference {largest:.1e}, {masks_differ} masks "
          f"({pixels_differ} pixels) differ")
    print(f"  CPU-time speed-up {cpu_speedup:.2f}x")
    verdict = "meets" if equal and speedup >= GOAL_SPEEDUP else "MISSES"
    print(f"  goal: >= {GOAL_SPEEDUP}x with identical detections -> {verdict} ({speedup:.2f}x)")
    after = machine_info(args.threads)["load_average"]
    print(f"load average after: {after[0]:.1f}")
    if args.out:
        write_result(args.out, {
            "benchmark": "detector", "model": args.model, "input": args.input, "rounds": args.rounds,
            "threads": args.threads, "machine": machine, "load_average_after": after,
            "fast_path": runners[fast].fast_path.describe(),
            "median_ms": {label: statistics.median(times[label]) * 1000 for label in labels},
            "cpu_ms": {label: statistics.median(cpu_times[label]) * 1000 for label in labels},
            "speedup": speedup, "cpu_speedup": cpu_speedup, "detections": detections,
            "largest_box_difference": largest, "masks_differ": masks_differ, "pixels_differ": pixels_differ,
            "goal_met": equal and speedup >= GOAL_SPEEDUP,
        })
    return 0 if equal and speedup >= GOAL_SPEEDUP else 1


if __name__ == "__main__":
    sys.exit(main())
