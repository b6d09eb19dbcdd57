"""What bf16 costs in accuracy and gives in speed on this CPU: box and mask AP of the synthetic set, fp32 vs bf16.

Run: .venv/bin/python benchmarks/bf16_accuracy.py [--rounds 3] [--threads 1] [--work-dir DIR]
     [--out benchmarks/results/bf16.json]

The trained tiny model (`benchmarks/tiny_model.py`) evaluates the synthetic validation split twice through the fast
path, as `recnext test --fuse-conv-bn` runs it: in fp32, and with `--dtype bf16`'s rewrite (the backbone in bf16,
the rest of the detector in fp32 on fp32 features, `recnext_cli.fastpath.speed_up_detector`). It prints both COCO
box and mask APs and their change, beside two speed ratios timed in turns in one process: the whole test loop, and
the backbone alone on one padded image. On a CPU without avx512_bf16 or AMX it records why it did not run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from recnext_cli.bench import machine_info, torch_threads, write_result
from recnext_cli.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import build_loop, coco_metrics, run_loop  # noqa: E402
from tiny_model import DEFAULT_WORK_DIR, tiny_model  # noqa: E402

SHOWN = ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50")
BACKBONE_CALLS = 20


def backbone_seconds(model, image: torch.Tensor) -> float:
    """Seconds for BACKBONE_CALLS calls of the detector's backbone (with its dtype conversions) on `image`."""
    backbone = model.module.backbone
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(BACKBONE_CALLS):
            backbone(image)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="synthetic set and tiny model")
    parser.add_argument("--out", type=Path, help="also write the raw results here as JSON")
    args = parser.parse_args(argv)

    from recnext_cli import compat
    from recnext_cli.fastpath import resolve_dtype
    from recnext_cli.runners import quiet_worker_output

    machine = machine_info(args.threads)
    record = {"benchmark": "bf16", "rounds": args.rounds, "threads": args.threads, "machine": machine}
    try:
        resolve_dtype("bf16", torch.device("cpu"))
    except UsageError as exc:
        print(f"bf16 not measured: {exc}")
        if args.out:
            write_result(args.out, {**record, "skipped": str(exc), "load_average_after": list(os.getloadavg())})
        return 0
    quiet_worker_output()
    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones with mmdet)

    root, checkpoint = tiny_model(args.work_dir)
    labels = ("fp32", "bf16")
    loops = {label: build_loop(root, checkpoint, True, dtype) for label, dtype in
             zip(labels, (torch.float32, torch.bfloat16))}
    loader = loops["fp32"][0]
    dataset = loader.dataset
    image = next(iter(loader))["img"][0].data[0]
    image = image if image.dim() == 4 else image[None]
    print(f"torch {machine['torch']}, {args.threads} thread(s), load average {machine['load_average'][0]:.1f}; "
          f"{len(dataset)} synthetic images, demo config (RecNeXt-M0) through the fast path, {args.rounds} rounds")
    loop_s = {label: [] for label in labels}
    backbone_s = {label: [] for label in labels}
    with torch_threads(args.threads):
        outputs = {label: run_loop(*loop)[2] for label, loop in loops.items()}
        for round_index in range(args.rounds):
            for label in labels[:: 1 if round_index % 2 == 0 else -1]:
                loop_s[label].append(run_loop(*loops[label])[0])
                backbone_s[label].append(backbone_seconds(loops[label][1], image))
    metrics = {label: coco_metrics(dataset, outputs[label]) for label in labels}
    ratios = {part: statistics.median(f / b for f, b in zip(seconds["fp32"], seconds["bf16"]))
              for part, seconds in (("test loop", loop_s), ("backbone", backbone_s))}
    change = {key: metrics["bf16"][key] - metrics["fp32"][key] for key in SHOWN}
    for label in labels:
        print(f"  {label}: " + ", ".join(f"{key} {metrics[label][key]:.4f}" for key in SHOWN))
    print("  bf16 - fp32: " + ", ".join(f"{key} {value:+.4f}" for key, value in change.items()))
    print(f"  bf16 speed over fp32: test loop {ratios['test loop']:.2f}x, backbone {ratios['backbone']:.2f}x "
          f"(medians of per-round ratios; backbone: {image.shape[-2]}x{image.shape[-1]} input)")
    after = list(os.getloadavg())
    print(f"load average after: {after[0]:.1f}")
    if args.out:
        write_result(args.out, {
            **record, "images": len(dataset), "load_average_after": after, "metrics": metrics,
            "ap_change": change, "speedup_test_loop": ratios["test loop"], "speedup_backbone": ratios["backbone"],
            "backbone_input": list(image.shape[-2:]),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
