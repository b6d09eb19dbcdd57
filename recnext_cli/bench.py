"""Latency benchmarks of RecNeXt backbones and Mask R-CNN detectors: timing statistics, model size, FLOPs, plots."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from recnext_cli import zoo
from recnext_cli.errors import EnvironmentProblem, UsageError

PARTS = ("backbone", "detector")
DTYPES = ("fp32", "fp16", "bf16")
_INPUT_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")
# The backbone halves the resolution five times; mmdet pads detector inputs to multiples of 32 for the same reason.
MIN_SIDE = 32
DETECTOR_SIDE_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Per-call wall-clock latency over the timed iterations, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    iters: int


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to time and how: one value per `recnext bench latency` option."""

    part: str = "backbone"
    device: str = "cpu"
    input_size: tuple[int, int] = (512, 512)  # height, width
    batch: int = 1
    fused: bool = True
    dtype: str = "fp32"
    compile: bool = False
    warmup: int = 10
    iters: int = 50
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    profile: bool = False  # also list the operators that take the most time


@dataclasses.dataclass(frozen=True)
class OperatorTime:
    """One operator's share of a profiled call (torch.profiler self time: excluding the operators it calls)."""

    name: str
    ms_per_call: float
    share: float  # of all operators' self time
    calls: int  # per model call


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """One model's measured latency beside its size, FLOPs and the numbers the RecNeXt README reports."""

    model: str
    title: str
    config: BenchConfig
    fast_path: str  # what the fast path did to the model, in words
    latency: LatencyStats
    throughput: float  # images per second at the median latency
    params: int  # of the model as published (BatchNorms unfolded)
    flops: int  # 2 x multiply-adds of one forward pass of the whole batch
    reported_latency_ms: float | None  # the README's iPhone latency
    reported_box_ap: float | None
    top_operators: tuple[OperatorTime, ...] = ()

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "title": self.title,
            **{key: value for key, value in dataclasses.asdict(self.config).items()},
            "input_size": list(self.config.input_size),
            "fast_path": self.fast_path,
            "median_ms": self.latency.median_ms,
            "p10_ms": self.latency.p10_ms,
            "p90_ms": self.latency.p90_ms,
            "mean_ms": self.latency.mean_ms,
            "throughput_img_s": self.throughput,
            "params": self.params,
            "gflops": self.gflops,
            "gmacs": self.gflops / 2,
            "reported_latency_ms": self.reported_latency_ms,
            "reported_box_ap": self.reported_box_ap,
            "top_operators": [dataclasses.asdict(operator) for operator in self.top_operators],
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(durations_s: Sequence[float]) -> LatencyStats:
    """Median, 10th and 90th percentile and mean of per-call durations given in seconds, in milliseconds."""
    if not durations_s:
        raise ValueError("no timed calls; --iters must be at least 1")
    ms = [duration * 1000 for duration in durations_s]
    return LatencyStats(percentile(ms, 50), percentile(ms, 10), percentile(ms, 90), sum(ms) / len(ms), len(ms))


def time_calls(
    fn: Callable[[], Any],
    *,
    warmup: int,
    iters: int,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] = lambda: None,
) -> list[float]:
    """Call `fn` `warmup` times untimed, then `iters` times, returning each timed call's duration in seconds.

    `synchronize` runs before each clock reading: CUDA kernels are asynchronous, and without waiting for them the
    clock would measure only the kernel launches.
    """
    for _ in range(warmup):
        fn()
    durations = []
    for _ in range(iters):
        synchronize()
        start = clock()
        fn()
        synchronize()
        durations.append(clock() - start)
    return durations


def parse_input_size(text: str) -> tuple[int, int]:
    """"512x512" (height x width) or "512" (square) as (height, width)."""
    match = _INPUT_SIZE.fullmatch(text)
    if match:
        size = int(match.group(1)), int(match.group(2))
    elif text.strip().isdigit():
        size = int(text), int(text)
    else:
        raise UsageError(f"--input {text!r} is not HEIGHTxWIDTH; write it like 512x512")
    if min(size) < MIN_SIDE:
        raise UsageError(
            f"--input {text} is too small: RecNeXt halves the image 5 times, so each side needs >= {MIN_SIDE}"
        )
    return size


def resolve_models(names: Sequence[str]) -> list[str]:
    """Zoo names for the given names; no names or "all" mean every model with a COCO detector, in the README's order."""
    if not names or [name.lower() for name in names] == ["all"]:
        return list(zoo.DETECTION_MODELS)
    return list(dict.fromkeys(zoo.get_model(name).name for name in names))


def random_backbone(name: str, seed: int = 0):
    """Backbone `name` in eval mode with seeded random weights and BatchNorm statistics away from the identity.

    A freshly built BatchNorm is the identity map in eval mode; a trained one is not, and folding it then changes
    every weight. Equality checks of the fast path need the second kind.
    """
    import torch
    from torch import nn

    from recnext_cli.nn import build_recnext

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_recnext(name)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def count_parameters(model) -> int:
    """The number of parameter elements (BatchNorm running statistics are buffers, not parameters)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as `torch.utils.flop_counter.FlopCounterMode` counts them.

    That is 2 x multiply-adds of convolutions and matrix products (attention included); element-wise ops, pooling,
    interpolation and NMS count as zero.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def check_config(config: BenchConfig) -> None:
    """Refuse settings that cannot be timed, with a message saying what to pass instead."""
    if config.part not in PARTS:
        raise UsageError(f"--part {config.part!r} is not one of {', '.join(PARTS)}")
    if config.dtype not in DTYPES:
        raise UsageError(f"--dtype {config.dtype!r} is not one of {', '.join(DTYPES)}")
    if config.batch < 1 or config.iters < 1 or config.warmup < 0:
        raise UsageError("--batch and --iters must be at least 1 and --warmup at least 0")
    if config.threads is not None and config.threads < 1:
        raise UsageError("--threads must be at least 1")
    half = (config.dtype, config.device[:4])
    if config.part == "detector" and config.dtype != "fp32" and half not in (("fp16", "cuda"), ("bf16", "cpu")):
        raise UsageError(
            "--part detector runs in half precision as fp16 on --device cuda (mmdet's fp16 mode) or as a bf16 "
            "backbone on --device cpu; use one of those, --dtype fp32, or time --part backbone"
        )
    height, width = config.input_size
    if config.part == "detector" and (height % DETECTOR_SIDE_MULTIPLE or width % DETECTOR_SIDE_MULTIPLE):
        raise UsageError(
            f"--part detector needs --input sides that are multiples of {DETECTOR_SIDE_MULTIPLE} "
            f"(mmdet pads images so), got {height}x{width}"
        )


@dataclasses.dataclass(frozen=True)
class Runner:
    """A prepared model on its input: `run()` is one timed call."""

    run: Callable[[], Any]
    params: int  # of the model as published (BatchNorms unfolded)
    flops: int
    fast_path: Any  # recnext_cli.fastpath.FastPath
    device: Any  # torch.device


def untimed_calls(fast_path, device, warmup: int) -> int:
    """How many calls to make before timing: `warmup`, raised to what the prepared model needs to reach steady state.

    A CUDA-graph compiled model (torch.compile mode "reduce-overhead") compiles on its first call, records its graph
    on the second and replays it from the third; a CPU compiled model compiles on its first call; oneDNN-fused
    convolutions reorder their weights on their first call. None of that may land among the timed calls, whatever
    --warmup says.
    """
    if fast_path.compile and device.type == "cuda":
        needed = 3
    elif fast_path.compile or fast_path.onednn_fusion:
        needed = 1
    else:
        needed = 0
    return max(warmup, needed)


def build_runner(name: str, config: BenchConfig, *, with_flops: bool = True) -> Runner:
    """Model `name` with random seeded weights, prepared as `config` says, on a seeded random input.

    `with_flops=False` skips counting FLOPs (one more forward pass, slow under the counter; `Runner.flops` is 0).
    """
    import torch

    from recnext_cli.fastpath import choose_fast_path, resolve_device, resolve_dtype

    check_config(config)
    entry = zoo.get_model(name)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    plan = choose_fast_path(device, dtype, fused=config.fused, compile=config.compile)
    if config.part != "detector":
        plan = dataclasses.replace(plan, detector_heads=False)  # a backbone has no heads to rewrite
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(config.batch, 3, *config.input_size, generator=generator)
    build = _detector_runner if config.part == "detector" else _backbone_runner
    run, params, flops = build(entry.name, images, config, plan, device, dtype, with_flops)
    return Runner(run, params, flops, plan, device)


def bench_latency(name: str, config: BenchConfig) -> BenchResult:
    """Build model `name` with random weights, prepare it as `config` says, and time it on a random input."""
    import torch

    entry = zoo.get_model(name)
    with torch_threads(config.threads):
        runner = build_runner(name, config)
        device = runner.device
        synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            warmup = untimed_calls(runner.fast_path, device, config.warmup)
            durations = time_calls(runner.run, warmup=warmup, iters=config.iters, synchronize=synchronize)
            operators = profile_operators(runner.run, device) if config.profile else ()
    latency = latency_stats(durations)
    metrics = entry.metrics
    return BenchResult(
        model=entry.name,
        title=entry.title,
        config=config,
        fast_path=runner.fast_path.describe(),
        latency=latency,
        throughput=config.batch / (latency.median_ms / 1000),
        params=runner.params,
        flops=runner.flops,
        reported_latency_ms=metrics.latency_ms if metrics else None,
        reported_box_ap=metrics.box_ap if metrics else None,
        top_operators=operators,
    )


def profile_operators(run: Callable[[], Any], device, calls: int = 3, top: int = 15) -> tuple[OperatorTime, ...]:
    """The `top` operators by self time over `calls` calls of `run` (already warmed up), under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    # On a GPU the kernels' time is what a call waits for; on a CPU the operators' own time.
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if getattr(event, attribute) > 0]
    total = sum(getattr(event, attribute) for event in events) or 1.0
    events.sort(key=lambda event: getattr(event, attribute), reverse=True)
    return tuple(
        OperatorTime(
            name=event.key,
            ms_per_call=getattr(event, attribute) / 1000 / calls,
            share=getattr(event, attribute) / total,
            calls=round(event.count / calls),
        )
        for event in events[:top]
    )


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: unchanged) inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _backbone_runner(name, images, config: BenchConfig, plan, device, dtype, with_flops: bool):
    import torch

    from recnext_cli.fastpath import prepare_for_inference, prepare_input

    model = random_backbone(name)
    params = count_parameters(model)
    with torch.inference_mode():
        flops = count_flops(lambda: model(images)) if with_flops else 0
    model = prepare_for_inference(model, plan, dtype=dtype, device=device)
    inputs = prepare_input(images, plan, dtype=dtype, device=device)
    return (lambda: model(inputs)), params, flops


def _detector_runner(name, images, config: BenchConfig, plan, device, dtype, with_flops: bool):
    """Mask R-CNN built from the published config with random weights, timed through mmdet's test-mode forward.

    fp16 is mmdet's own fp16 mode (`wrap_fp16_model`: autocast in the network, fp32 box decoding and NMS).
    """
    import torch

    from recnext_cli.fastpath import prepare_input, speed_up_detector

    detector = build_random_detector(name)
    params = count_parameters(detector)
    metas = detector_metas(config.input_size, config.batch)

    def forward(x):
        return detector(return_loss=False, rescale=False, img=[x], img_metas=[metas])

    with torch.inference_mode():
        flops = count_flops(lambda: forward(images)) if with_flops else 0
    detector = speed_up_detector(detector, plan, dtype=dtype, device=device)
    if dtype is torch.float16:
        from mmcv.runner import wrap_fp16_model

        wrap_fp16_model(detector)
    inputs = prepare_input(images, plan, dtype=dtype, device=device)
    return (lambda: forward(inputs)), params, flops


def detector_metas(input_size: tuple[int, int], batch: int) -> list[dict]:
    """mmdet image metas for `batch` unscaled, unflipped images of `input_size` (height, width), already padded."""
    import numpy as np

    height, width = input_size
    meta = {
        "ori_shape": (height, width, 3),
        "img_shape": (height, width, 3),
        "pad_shape": (height, width, 3),
        "scale_factor": np.ones(4, dtype=np.float32),
        "flip": False,
        "flip_direction": None,
    }
    return [dict(meta) for _ in range(batch)]


def build_random_detector(name: str):
    """Model `name`'s Mask R-CNN from its published config, in eval mode, with seeded random weights."""
    import torch

    try:
        from recnext_cli import compat

        compat.apply_all()
        from mmcv import Config
        from mmdet.models import build_detector

        # Importing recnext_cli.models also registers the RecNeXt backbones with mmdet.
        from recnext_cli.models import config_file
    except ImportError as exc:
        raise EnvironmentProblem(
            f"--part detector needs mmcv-full and mmdet ({exc}); run `recnext setup`, or time --part backbone"
        ) from None

    cfg = Config.fromfile(str(config_file(name)))
    # Random weights (torch's default initialisation; mmcv's init_weights would log every tensor), so that no
    # checkpoint is needed. How many boxes reach the mask head depends on them, so they are seeded: the same model
    # gets the same weights, and the same head load, in every run.
    cfg.model.backbone.init_cfg = None
    cfg.model.pretrained = None
    cfg.model.train_cfg = None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        detector = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
    return busy_heads(detector).eval()


def busy_heads(detector):
    """`detector` (changed in place, also returned) with its random RoI heads as decided as trained ones.

    Freshly initialised, the box classifier's logits are nearly equal (standard deviation 0.05): every class
    scores about 1/81, under the 0.05 score threshold, so no box would reach the mask head or the mask paste, and
    a timing would leave out a third of a real inference. Scaled up 40 times, with the background logit lowered,
    each proposal names a few classes, and the test keeps `max_per_img` (100) detections as on a busy COCO image.
    The mask logits are scaled 30 times, to a trained head's confidence (2% of pixels within 0.01 of the 0.5
    threshold), so that equal masks mean equal computations rather than luck at the threshold.
    """
    import torch

    roi_head = detector.roi_head
    with torch.no_grad():
        roi_head.bbox_head.fc_cls.weight.mul_(40.0)
        roi_head.bbox_head.fc_cls.bias[-1] = -10.0
        if getattr(roi_head, "mask_head", None) is not None:
            roi_head.mask_head.conv_logits.weight.mul_(30.0)
    return detector


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a benchmark result depends on: CPU and its ISA flags, threads, load, library versions, date."""
    import os
    import platform
    from datetime import datetime, timezone

    import torch

    from recnext_cli.fastpath import cpu_flags

    isa_prefixes = ("avx", "amx", "fma", "sse4", "f16c", "asimd", "sve")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": sorted(flag for flag in cpu_flags() if flag.startswith(isa_prefixes)),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads or torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor()


def write_result(path: Path, record: dict[str, Any]) -> Path:
    """Write a benchmark's raw record as JSON through a temporary file beside `path`: never a half-written `path`."""
    import json
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(record, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def markdown_table(results: Sequence[BenchResult]) -> str:
    """A Markdown table of the measurements next to the README's reported latency (iPhone) and box AP."""
    if not results:
        return ""
    config = results[0].config
    header = (
        "Model", "Params (M)", "GFLOPs", "Median (ms)", "p10 (ms)", "p90 (ms)", "img/s",
        "Reported latency (iPhone)", "Reported $AP^b$",
    )  # fmt: skip
    lines = [_row(header), _row((":---",) + ("---:",) * (len(header) - 1))]
    for result in results:
        lines.append(
            _row((
                result.title,
                f"{result.params / 1e6:.2f}",
                f"{result.gflops:.2f}",
                f"{result.latency.median_ms:.2f}",
                f"{result.latency.p10_ms:.2f}",
                f"{result.latency.p90_ms:.2f}",
                f"{result.throughput:.1f}",
                "-" if result.reported_latency_ms is None else f"{result.reported_latency_ms:.1f}ms",
                "-" if result.reported_box_ap is None else f"{result.reported_box_ap:.1f}",
            ))
        )
    text = "\n".join(lines) + "\n\n" + describe(config, results[0].fast_path) + "\n"
    for result in results:
        if result.top_operators:
            text += "\n" + operator_table(result) + "\n"
    return text


def operator_table(result: BenchResult) -> str:
    """A Markdown table of the operators that took the most time in `result`'s profiled calls."""
    lines = [
        f"Top operators of {result.title} ({result.config.part}), by self time per call:",
        "",
        _row(("Operator", "ms per call", "share", "calls per call")),
        _row((":---", "---:", "---:", "---:")),
    ]
    for operator in result.top_operators:
        lines.append(
            _row((f"`{operator.name}`", f"{operator.ms_per_call:.2f}", f"{operator.share:.1%}", str(operator.calls)))
        )
    return "\n".join(lines)


def describe(config: BenchConfig, fast_path: str) -> str:
    """One line saying what was timed (`fast_path`: what the fast path did), for captions and plot titles."""
    height, width = config.input_size
    threads = f", {config.threads} thread(s)" if config.threads else ""
    return (
        f"{config.part} on {config.device}{threads}, batch {config.batch} at {height}x{width}, {config.dtype}, "
        f"{fast_path}; {config.iters} timed calls after at least {config.warmup} warm-up calls"
    )


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def plot_ap_vs_latency(results: Sequence[BenchResult], path: Path) -> Path:
    """Write a PNG of reported box AP against measured median latency, one labelled point per model."""
    points = [result for result in results if result.reported_box_ap is not None]
    if not points:
        raise UsageError("--plot needs at least one detection model (m3-m5, a3-a5): the others have no reported box AP")
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib; install it with `pip install matplotlib`") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    try:
        for series, marker in (("M", "o"), ("A", "s")):
            members = sorted((r for r in points if r.model[0].upper() == series), key=lambda r: r.latency.median_ms)
            if members:
                axes.plot(
                    [r.latency.median_ms for r in members],
                    [r.reported_box_ap for r in members],
                    marker=marker,
                    label=f"RecNeXt-{series}",
                )
        for result in points:
            point = (result.latency.median_ms, result.reported_box_ap)
            axes.annotate(result.title, point, textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xlabel("measured median latency (ms)")
        axes.set_ylabel("reported box AP (COCO val2017)")
        axes.set_title(describe(points[0].config, points[0].fast_path), fontsize=7, wrap=True)
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
