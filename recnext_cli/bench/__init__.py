"""Latency benchmarks of RecNeXt backbones and Mask R-CNN detectors: timing statistics, model size, FLOPs, plots.

The modules below each hold one part; this package re-exports what commands, benchmarks/ and tests use. None of
them imports torch before a function needs it, so `recnext --help` stays light.
"""

from __future__ import annotations

from recnext_cli.bench.config import (
    DETECTOR_SIDE_MULTIPLE,
    DTYPES,
    MIN_SIDE,
    PARTS,
    BenchConfig,
    check_config,
    parse_input_size,
    resolve_models,
)
from recnext_cli.bench.latency import BenchResult, bench_latency
from recnext_cli.bench.machine import machine_info, write_result
from recnext_cli.bench.models import (
    Runner,
    build_random_detector,
    build_runner,
    busy_heads,
    count_flops,
    count_parameters,
    detector_metas,
    random_backbone,
)
from recnext_cli.bench.render import (
    describe,
    markdown_table,
    operator_table,
    plot_ap_vs_latency,
)
from recnext_cli.bench.timing import (
    LatencyStats,
    OperatorTime,
    latency_stats,
    percentile,
    profile_operators,
    speedup_in_turns,
    time_calls,
    time_in_turns,
    torch_threads,
    untimed_calls,
)

__all__ = [
    "DETECTOR_SIDE_MULTIPLE",
    "DTYPES",
    "MIN_SIDE",
    "PARTS",
    "BenchConfig",
    "BenchResult",
    "LatencyStats",
    "OperatorTime",
    "Runner",
    "bench_latency",
    "build_random_detector",
    "build_runner",
    "busy_heads",
    "check_config",
    "count_flops",
    "count_parameters",
    "describe",
    "detector_metas",
    "latency_stats",
    "machine_info",
    "markdown_table",
    "operator_table",
    "parse_input_size",
    "percentile",
    "plot_ap_vs_latency",
    "profile_operators",
    "random_backbone",
    "resolve_models",
    "speedup_in_turns",
    "time_calls",
    "time_in_turns",
    "torch_threads",
    "untimed_calls",
    "write_result",
]
