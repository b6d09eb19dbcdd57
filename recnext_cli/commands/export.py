"""`recnext export`: a RecNeXt backbone, BatchNorms folded, as an ONNX file checked against PyTorch with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer


def _model_names(incomplete: str) -> list[str]:
    from recnext_cli import zoo

    return [name for name in zoo.MODELS if name.startswith(incomplete.lower())]


def export(
    name: Annotated[str, typer.Argument(
        help="Zoo model (m0-m5, a0-a5).", autocompletion=_model_names, show_default=False,
    )],
    file_format: Annotated[Literal["onnx"], typer.Option("--format", help="File format.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="File to write (default: recnext_NAME_backbone.onnx here); replaced in one step.",
        show_default=False,
    )] = None,
    input_size: Annotated[str, typer.Option(
        "--input", metavar="HxW", help="Height x width of the traced and checked input (the file accepts any size).",
    )] = "512x512",
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Weights to export (detector, ImageNet or backbone checkpoint). Default: the zoo's "
        "COCO checkpoint if cached and verified, else seeded random weights.", show_default=False,
    )] = None,
) -> None:
    """Export NAME's backbone, BatchNorms folded as recnext's fast path does, as ONNX, and check it with onnxruntime.

    The graph takes float32 images (batch, 3, height, width), any batch and size, and returns the four stage
    outputs c2-c5 (strides 4-32) that mmdet's FPN takes. The file is written only if onnxruntime's outputs are within
    1e-4 of PyTorch's. The whole Mask R-CNN is not exported: mmdet 2.x's ONNX path needs mmcv-full's onnxruntime
    custom ops (RoIAlign, NMS), which mmcv 1.7 no longer builds.
    """
    from rich.console import Console
    from rich.markup import escape

    from recnext_cli import export as library
    from recnext_cli import zoo
    from recnext_cli.bench import parse_input_size
    from recnext_cli.errors import UsageError

    model = zoo.get_model(name)
    size = parse_input_size(input_size)
    if checkpoint is not None and not checkpoint.is_file():
        raise UsageError(f"--checkpoint {checkpoint} does not exist; check the path")
    library.require_export_stack()
    target = out or library.default_path(model.name)
    console = Console(highlight=False)
    with console.status(f"exporting {model.title} to {file_format} and checking it with onnxruntime"):
        result = library.export_backbone(model.name, target, size, checkpoint)
    console.print(f"wrote {escape(str(result.path))} ({result.size_bytes / 2**20:.1f} MiB): {model.title} backbone, "
                  f"BatchNorms folded, opset {library.OPSET}", soft_wrap=True)
    console.print(f"weights: {escape(result.weights)}", soft_wrap=True)
    shapes = ", ".join(
        f"{label} {'x'.join(map(str, shape))}" for label, shape in zip(library.OUTPUT_NAMES, result.output_shapes)
    )
    console.print(f"outputs for a {size[0]}x{size[1]} image: {shapes}", soft_wrap=True)
    console.print(
        f"onnxruntime vs PyTorch: max |difference| {result.max_abs_diff:.1e} (limit {library.TOLERANCE:g}); "
        f"vs the published unfolded model {result.max_abs_diff_published:.1e}", soft_wrap=True,
    )
