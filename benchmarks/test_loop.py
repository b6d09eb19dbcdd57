"""Time `recnext test`'s evaluation loop against mmdet's plain test loop on the synthetic set; check equal metrics.

Run: .venv/bin/python benchmarks/test_loop.py [--rounds 3] [--threads 1] [--work-dir DIR]
     [--out benchmarks/results/test_loop.json]

Both loops are mmdet's `single_gpu_test` over the same data loader (the demo config's test pipeline on the
synthetic validation split) with the same trained tiny checkpoint (`benchmarks/tiny_model.py`), built and loaded
as `recnext_cli.runners.test` builds them: "plain" is the model as mmdet's tools/test.py runs it, "recnext" is what
`recnext test --fuse-conv-bn` runs (`fuse_batch_norms`: recnext's fast path, then mmcv's conv-BN folding). The two
run in turns in one process, the order reversed every other round; the speed-up is the median of per-round ratios
of images per second. Every COCO box and mask metric must be equal to 3 decimals. Exit code 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from recnext_cli.bench import machine_info, torch_threads, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import CONFIG, DEFAULT_WORK_DIR, tiny_model  # noqa: E402

GOAL_SPEEDUP = 1.2
TOLERANCE = 1e-3


def build_loop(root: Path, checkpoint: Path, fast: bool, dtype: torch.dtype = torch.float32):
    """(data loader, model ready for single_gpu_test) as recnext_cli.runners.test sets them up on one CPU process;
    `fast`: as `--fuse-conv-bn` prepares it, with the backbone in `dtype`."""
    from mmdet.datasets import build_dataloader, build_dataset
    from mmdet.utils import build_dp, compat_cfg

    from recnext_cli.runners import build_detector, load_config
    from recnext_cli.runners.test import fuse_batch_norms, load_weights

    cfg = compat_cfg(load_config(str(CONFIG), root, []))
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg = None
    cfg.data.test.test_mode = True
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = build_dataset(cfg.data.test)
        model = build_detector(cfg, "cpu")
        load_weights(model, str(checkpoint))
    if fast and dtype is torch.float32:
        model = fuse_batch_norms(model, "cpu")
    elif fast:
        from mmcv.cnn import fuse_conv_bn

        from recnext_cli.fastpath import speed_up_detector

        # What fuse_batch_norms does, with a dtype: recnext test has no bf16 flag yet.
        model = fuse_conv_bn(speed_up_detector(model, dtype=dtype, device="cpu"))
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=0, dist=False, shuffle=False)
    return loader, build_dp(model, "cpu", device_ids=[0])


def run_loop(loader, model) -> tuple[float, float, list]:
    """(wall-clock seconds, process CPU seconds, outputs) of one pass of mmdet's single_gpu_test, progress bar
    dropped."""
    from mmdet.apis import single_gpu_test

    with stdout_dropped():
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs = single_gpu_test(model, loader)
        return time.perf_counter() - started, time.process_time() - cpu_started, outputs


@contextlib.contextmanager
def stdout_dropped():
    """File descriptor 1 on /dev/null inside the block: mmcv's progress bar holds the sys.stdout of its import."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def coco_metrics(dataset, outputs) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True):
        reported = dataset.evaluate(outputs, metric=["bbox", "segm"], logger="silent")
    return {key: value for key, value in reported.items() if isinstance(value, float)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="synthetic set and tiny model")
    parser.add_argument("--out", type=Path, help="also write the raw results here as JSON")
    args = parser.parse_args(argv)

    from recnext_cli import compat
    from recnext_cli.runners import quiet_worker_output

    quiet_worker_output()
    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones with mmdet)

    root, checkpoint = tiny_model(args.work_dir)
    machine = machine_info(args.threads)
    labels = ("plain mmdet", "recnext test")
    loops = {label: build_loop(root, checkpoint, fast) for label, fast in zip(labels, (False, True))}
    dataset = loops[labels[0]][0].dataset
    print(f"torch {machine['torch']}, {args.threads} thread(s), load average {machine['load_average'][0]:.1f}; "
          f"{len(dataset)} synthetic images, demo config (RecNeXt-M0), {args.rounds} rounds")
    seconds = {label: [] for label in labels}
    cpu_seconds = {label: [] for label in labels}
    with torch_threads(args.threads):
        outputs = {label: run_loop(*loop)[2] for label, loop in loops.items()}  # warm-up, and the outputs compared
        for round_index in range(args.rounds):
            for label in labels[:: 1 if round_index % 2 == 0 else -1]:
                wall, cpu, _ = run_loop(*loops[label])
                seconds[label].append(wall)
                cpu_seconds[label].append(cpu)
    metrics = {label: coco_metrics(dataset, outputs[label]) for label in labels}
    baseline, fast = labels
    # Images per second in the same round: the same images, so the ratio of times.
    speedup = statistics.median(b / f for b, f in zip(seconds[baseline], seconds[fast]))
    cpu_speedup = statistics.median(b / f for b, f in zip(cpu_seconds[baseline], cpu_seconds[fast]))
    images_per_s = {label: len(dataset) / statistics.median(seconds[label]) for label in labels}
    for label in labels:
        print(f"  {label:<14} {images_per_s[label]:6.1f} images/s (median of {args.rounds}; CPU time "
              f"{statistics.median(cpu_seconds[label]) / len(dataset) * 1000:.1f} ms per image)")
    print(f"  CPU-time speed-up {cpu_speedup:.2f}x")
    differ = {key: (metrics[baseline].get(key), metrics[fast].get(key))
              for key in metrics[baseline].keys() | metrics[fast].keys()
              if abs(metrics[baseline].get(key, -1) - metrics[fast].get(key, -2)) >= TOLERANCE}
    shown = ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50")
    print("  metrics:", ", ".join(f"{key} {metrics[baseline][key]:.4f}" for key in shown))
    print(f"  {'all metrics equal' if not differ else f'metrics DIFFER: {differ}'}")
    met = not differ and speedup >= GOAL_SPEEDUP
    print(f"  goal: >= {GOAL_SPEEDUP}x images/s with equal metrics -> {'meets' if met else 'MISSES'} ({speedup:.2f}x)")
    after = list(os.getloadavg())
    print(f"load average after: {after[0]:.1f}")
    if args.out:
        write_result(args.out, {
            "benchmark": "test_loop", "images": len(dataset), "rounds": args.rounds, "threads": args.threads,
            "machine": machine, "load_average_after": after,
            "images_per_s": images_per_s, "speedup": speedup, "cpu_speedup": cpu_speedup, "metrics": metrics[baseline],
            "metrics_equal": not differ, "goal_met": met,
        })
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
