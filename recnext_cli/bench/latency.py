"""One model's latency measurement: built, timed and recorded beside its size, FLOPs and reported numbers."""

from __future__ import annotations

import dataclasses
from typing import Any

from recnext_cli import zoo
from recnext_cli.bench.config import BenchConfig
from recnext_cli.bench.models import build_runner
from recnext_cli.bench.timing import (
    LatencyStats,
    OperatorTime,
    latency_stats,
    profile_operators,
    time_calls,
    torch_threads,
    untimed_calls,
)


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
