"""How benchmark results are shown: the Markdown tables `recnext bench latency` prints, their caption, the AP plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from recnext_cli.errors import UsageError
from recnext_cli.results import (
    format_percent,
    latency_cell,
    markdown_row,
    percent_to_fraction,
)

if TYPE_CHECKING:
    from recnext_cli.bench.config import BenchConfig
    from recnext_cli.bench.latency import BenchResult


def markdown_table(results: Sequence[BenchResult]) -> str:
    """A Markdown table of the measurements next to the README's reported latency (iPhone) and box AP."""
    if not results:
        return ""
    config = results[0].config
    header = (
        "Model", "Params (M)", "GFLOPs", "Median (ms)", "p10 (ms)", "p90 (ms)", "img/s",
        "Reported latency (iPhone)", "Reported $AP^b$",
    )  # fmt: skip
    lines = [markdown_row(header), markdown_row((":---",) + ("---:",) * (len(header) - 1))]
    for result in results:
        lines.append(markdown_row(_cells(result)))
    text = "\n".join(lines) + "\n\n" + describe(config, results[0].fast_path) + "\n"
    for result in results:
        if result.top_operators:
            text += "\n" + operator_table(result) + "\n"
    return text


def _cells(result: BenchResult) -> tuple[str, ...]:
    # The zoo keeps the README's box AP in percent; the README's own table formats it from the fraction.
    box_ap = result.reported_box_ap
    return (
        result.title,
        f"{result.params / 1e6:.2f}",
        f"{result.gflops:.2f}",
        f"{result.latency.median_ms:.2f}",
        f"{result.latency.p10_ms:.2f}",
        f"{result.latency.p90_ms:.2f}",
        f"{result.throughput:.1f}",
        latency_cell(result.reported_latency_ms),
        "-" if box_ap is None else format_percent(percent_to_fraction(box_ap)),
    )


def operator_table(result: BenchResult) -> str:
    """A Markdown table of the operators that took the most time in `result`'s profiled calls."""
    lines = [
        f"Top operators of {result.title} ({result.config.part}), by self time per call:",
        "",
        markdown_row(("Operator", "ms per call", "share", "calls per call")),
        markdown_row((":---", "---:", "---:", "---:")),
    ]
    for operator in result.top_operators:
        cells = (f"`{operator.name}`", f"{operator.ms_per_call:.2f}", f"{operator.share:.1%}", str(operator.calls))
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def describe(config: BenchConfig, fast_path: str) -> str:
    """One line saying what was timed (`fast_path`: what the fast path did), for captions and plot titles."""
    height, width = config.input_size
    threads = f", {config.threads} thread(s)" if config.threads else ""
    return (
        f"{config.part} on {config.device}{threads}, batch {config.batch} at {height}x{width}, {config.dtype}, "
        f"{fast_path}; {config.iters} timed calls after at least {config.warmup} warm-up calls"
    )


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
