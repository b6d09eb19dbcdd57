"""Which backbone rewrites pay on a GPU: eager vs BatchNorm folding, channels-last, fp16 and CUDA graphs, in turns.

Run on a GPU machine: python benchmarks/cuda_fastpath.py [--models m3 a3] [--input 512x512] [--batch 1]
     [--rounds 100] [--budget 150] [--out cuda_fastpath.json]
(`--device cpu --input 64x64 --rounds 3` rehearses it here, without the CUDA-graph variants.)

`recnext_cli.fastpath.choose_fast_path` picks the CUDA rewrites by rule; this script measures them. Every variant of a
model lives in one process and is called in turns (one synchronised call of each per round), so a clock change or a
busy neighbour slows all alike; a speed-up is the median over rounds of eager time / variant time in the same round.
CUDA-graph variants capture the prepared model once and replay it, which removes the per-kernel launch cost that
dominates batch-1 latency of a small network. fp32 outputs are compared with eager's in strict fp32 (TF32 off): the
rewrites must keep them within 1e-4 relative (max |diff| / max |eager|). The default TF32 difference is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from recnext_cli.bench import latency_stats, parse_input_size, speedup_in_turns, time_in_turns
from recnext_cli.bench.models import random_backbone
from recnext_cli.fastpath import FastPath, prepare_for_inference, prepare_input

TOLERANCE = 1e-4
# label -> (plan, dtype, CUDA graph)
VARIANTS: dict[str, tuple[FastPath, torch.dtype, bool]] = {
    "eager": (FastPath(fold_batchnorm=False, channels_last=False), torch.float32, False),
    "folded": (FastPath(fold_batchnorm=True, channels_last=False), torch.float32, False),
    "folded, channels-last": (FastPath(fold_batchnorm=True, channels_last=True), torch.float32, False),
    "folded fp16": (FastPath(fold_batchnorm=True, channels_last=False), torch.float16, False),
    "folded, channels-last fp16": (FastPath(fold_batchnorm=True, channels_last=True), torch.float16, False),
    "eager + CUDA graph": (FastPath(fold_batchnorm=False, channels_last=False), torch.float32, True),
    "folded + CUDA graph": (FastPath(fold_batchnorm=True, channels_last=False), torch.float32, True),
    "folded, channels-last + CUDA graph": (FastPath(fold_batchnorm=True, channels_last=True), torch.float32, True),
    "folded fp16 + CUDA graph": (FastPath(fold_batchnorm=True, channels_last=False), torch.float16, True),
}


def captured(run: Callable[[], torch.Tensor | list]) -> Callable[[], torch.Tensor | list]:
    """`run` recorded once as a CUDA graph; the returned function replays it (same input buffer, same outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # cuDNN picks its algorithms before the capture, as the graph cannot
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()

    def replay():
        graph.replay()
        return outputs

    return replay


def build(name: str, plan: FastPath, dtype: torch.dtype, graph: bool, images: torch.Tensor, device: torch.device):
    model = prepare_for_inference(random_backbone(name), plan, dtype=dtype, device=device)
    inputs = prepare_input(images, plan, dtype=dtype, device=device)
    run = lambda: model(inputs)  # noqa: E731
    return captured(run) if graph else run


def features(outputs) -> list[torch.Tensor]:
    return [out.detach().float().cpu().clone() for out in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def relative_difference(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    return max(((out - ref).abs().max() / ref.abs().max()).item() for out, ref in zip(outputs, references))


def set_tf32(on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def strict_differences(name: str, images: torch.Tensor, device: torch.device) -> dict[str, dict[str, float]]:
    """Each fp32 eager-mode rewrite's max relative difference from eager, in strict fp32 and with torch's TF32 default."""
    default_tf32 = torch.backends.cudnn.allow_tf32
    differences: dict[str, dict[str, float]] = {}
    try:
        for tf32, key in ((False, "strict_fp32"), (default_tf32, "default")):
            set_tf32(tf32)
            reference = features(build(name, *VARIANTS["eager"], images, device)())
            for label, (plan, dtype, graph) in VARIANTS.items():
                if dtype is torch.float32 and not graph:
                    differences.setdefault(label, {})[key] = relative_difference(
                        features(build(name, plan, dtype, graph, images, device)()), reference)
    finally:
        set_tf32(default_tf32)
    return differences


def time_phase(name: str, labels: list[str], args, images, device, deadline: float, differences: dict, errors: dict):
    """Build `labels` (eager first) and time them in turns; {label: durations in seconds}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reference = None
    runs = {}
    for label in labels:
        if time.monotonic() > deadline:
            errors[label] = "skipped: the script's budget was spent"
            continue
        try:
            runs[label] = build(name, *VARIANTS[label], images, device)
            outputs = features(runs[label]())
            reference = reference or outputs
            differences.setdefault(label, {})["as_timed"] = relative_difference(outputs, reference)
        except Exception as error:  # noqa: BLE001 - one variant failing must not cost the others' figures
            errors[label] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"  {name} {label}: {errors[label]}", flush=True)
            runs.pop(label, None)

    def failed(label: str, error: Exception) -> None:
        errors[label] = f"{type(error).__name__} while timing: {error}".splitlines()[0][:300]
        print(f"  {name} {label}: {errors[label]}", flush=True)

    return time_in_turns(runs, warmup=args.warmup, rounds=args.rounds, synchronize=sync,
                         keep_going=lambda: time.monotonic() <= deadline, on_error=failed)


def bench_model(name: str, args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    images = torch.randn(args.batch, 3, *parse_input_size(args.input), generator=torch.Generator().manual_seed(0))
    errors: dict[str, str] = {}
    variants = {}
    with torch.inference_mode():
        differences = strict_differences(name, images, device)
        # Eager-mode variants first, CUDA graphs apart with their own eager baseline: a failed capture can leave the
        # CUDA context unusable, and it must not cost the eager-mode figures.
        phases = [[label for label, (_, _, graph) in VARIANTS.items() if not graph]]
        if device.type == "cuda":
            phases.append(["eager", *(label for label, (_, _, graph) in VARIANTS.items() if graph)])
        for phase, labels in enumerate(phases):
            times = time_phase(name, labels, args, images, device, deadline, differences, errors)
            for label, durations in times.items():
                if not durations or not times.get("eager"):
                    continue
                stats = latency_stats(durations)
                key = label if phase == 0 or label != "eager" else "eager (CUDA-graph phase)"
                variants[key] = {"median_ms": stats.median_ms, "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms,
                                 "rounds": len(durations),
                                 "speedup": speedup_in_turns(times["eager"], durations),
                                 "relative_difference": differences.get(label, {})}
    equal = {label: d["strict_fp32"] <= TOLERANCE for label, d in differences.items() if "strict_fp32" in d}
    return {"model": name, "variants": variants, "errors": errors, "fp32_equal_in_strict_fp32": equal}


def report(record: dict) -> str:
    lines = [f"RecNeXt-{record['model'].upper()}"]
    for label, variant in record["variants"].items():
        diffs = ", ".join(f"{key} {value:.1e}" for key, value in variant["relative_difference"].items())
        lines.append(f"  {label:<36} {variant['rounds']:4d} rounds, median {variant['median_ms']:7.2f} ms  p10 {variant['p10_ms']:7.2f}  "
                     f"p90 {variant['p90_ms']:7.2f}  {variant['speedup']:5.2f}x  rel. diff: {diffs}")
    lines += [f"  {label}: {error}" for label, error in record["errors"].items()]
    lines.append(f"  fp32 rewrites equal eager in strict fp32 (<= {TOLERANCE:.0e}): {record['fp32_equal_in_strict_fp32']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["m3", "a3"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--input", default="512x512", help="height x width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100, help="timed calls of each variant, taken in turns")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--budget", type=float, default=150, help="seconds; later variants and rounds are skipped")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}; input {args.batch}x3x{args.input}; TF32 convolutions by default: "
          f"{torch.backends.cudnn.allow_tf32}", flush=True)
    records = []
    for name in args.models:
        records.append(bench_model(name, args, device, deadline))
        print(report(records[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": where, "torch": torch.__version__, "input": args.input,
                                        "batch": args.batch, "models": records}, indent=2) + "\n")
    return 0 if all(all(r["fp32_equal_in_strict_fp32"].values()) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
