"""`recnext bench latency`: time backbones or whole detectors and print them beside the README's reported numbers."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from recnext_cli.commands import _options as opt

if TYPE_CHECKING:
    from recnext_cli.bench import BenchResult

app = typer.Typer(
    name="bench",
    help="Benchmarks: measured latency, throughput, parameters and FLOPs of the RecNeXt models.",
    no_args_is_help=True,
)


class Part(str, enum.Enum):
    backbone = "backbone"
    detector = "detector"


class Dtype(str, enum.Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


@app.command("latency")
def latency(
    names: Optional[list[str]] = typer.Argument(
        None, metavar="[NAME...|all]", help="Zoo models (m3, a5, ...); none or 'all' means the six detection models."
    ),
    part: Part = typer.Option(
        Part.backbone, "--part", help="Time the backbone alone, or the whole Mask R-CNN (needs mmdet)."
    ),
    device: opt.DeviceOption = None,
    input_size: str = typer.Option(
        "512x512", "--input", metavar="HxW", help="Input height x width, fed as is (no resize)."
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Images per call."),
    fused: bool = typer.Option(
        True,
        "--fused/--no-fused",
        help="The fast path chosen for this device (stated under the table); --no-fused times the model as published.",
    ),
    dtype: Dtype = typer.Option(
        Dtype.fp32,
        "--dtype",
        help="Precision of the timed model; on CPU bf16 needs avx512_bf16 or AMX, fp16 AVX512-FP16.",
    ),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile (CUDA graphs on cuda, weight freezing on cpu); compiling takes minutes."
    ),
    warmup: int = typer.Option(
        10, "--warmup", min=0, metavar="N", help="Untimed calls first (compiled models get at least what they need)."
    ),
    iters: int = typer.Option(50, "--iters", min=1, metavar="N", help="Timed calls."),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        min=1,
        metavar="N",
        help="torch CPU threads; on a shared machine 1 gives the steadiest numbers.",
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Also list the operators taking the most time (torch.profiler, 3 calls)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of the Markdown table."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", metavar="FILE.png", help="Also draw reported box AP against measured latency."
    ),
) -> None:
    """Median, p10 and p90 latency, throughput, parameters and GFLOPs, beside the README's latency and box AP.

    Latency is wall-clock per call, with torch.cuda.synchronize() before and after each call on a GPU.

    GFLOPs: torch.utils.flop_counter.FlopCounterMode on the model as published, 2 x multiply-adds of convs and matmuls.

    Tables that call multiply-adds FLOPs (GMACs in JSON) show half. Parameters: the published, unfused model.

    The README's latency was measured on an iPhone. Weights are random and seeded; detector heads see untrained boxes.
    """
    from rich.console import Console

    from recnext_cli.bench import (
        BenchConfig,
        bench_latency,
        markdown_table,
        parse_input_size,
        plot_ap_vs_latency,
        resolve_models,
    )

    models = resolve_models(names or [])
    config = BenchConfig(
        part=part.value,
        device=opt.device_name(device) or _default_device(),
        input_size=parse_input_size(input_size),
        batch=batch,
        fused=fused,
        dtype=dtype.value,
        compile=compile_model,
        warmup=warmup,
        iters=iters,
        threads=threads,
        profile=profile,
    )
    console = Console(stderr=True)
    results = []
    for name in models:
        with console.status(f"timing {name} ({config.part}, {config.device})"):
            results.append(bench_latency(name, config))
    if as_json:
        from recnext_cli.outputs import document, dumps

        typer.echo(dumps(document("bench", rows=[_json_row(result) for result in results])))
    else:
        # Plain Markdown, not a Rich table, so it pastes into a README next to the published one.
        typer.echo(markdown_table(results), nl=False)
    if plot is not None:
        console.print(f"wrote {plot_ap_vs_latency(results, plot)}")


def _json_row(result: BenchResult) -> dict[str, Any]:
    """A result as a recnext.bench row: the README's box AP as a fraction under mmdet's name, like every schema."""
    from recnext_cli.results import percent_to_fraction

    row = {}
    for key, value in result.as_dict().items():
        if key == "reported_box_ap":  # the zoo keeps the README's percent; the JSON contract wants a fraction
            row["reported_bbox_mAP"] = None if value is None else percent_to_fraction(value)
        else:
            row[key] = value
    return row


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
