"""`recnext infer`: draw a detector's boxes, class names, scores and masks onto images and list the detections."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from recnext_cli.commands import _options as opt

if TYPE_CHECKING:
    from recnext_cli.pipelines import Drawings

# --score-thr's default; `recnext demo` draws with it too.
SCORE_THR = 0.3


def infer(
    name: Annotated[str, typer.Argument(
        help="Zoo model (m3, m4, m5, a3, a4, a5), or any label with both --config and --checkpoint.",
    )],
    images: Annotated[list[Path], typer.Argument(
        metavar="IMAGE...",
        help="Image files (PNG, JPEG, ...), folders (the images directly in them) or quoted glob patterns "
        "('photos/**/*.jpg').",
    )],
    checkpoint: opt.DetectorCheckpoint = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="Your mmdet config instead of the zoo model's (class names: checkpoint meta, else the config)",
        show_default=False,
    )] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the drawings, one PNG per image.")] = Path("recnext_infer"),
    score_thr: Annotated[float, typer.Option(
        "--score-thr", min=0.0, max=1.0, help="Keep detections scoring above this.",
    )] = SCORE_THR,
    device: opt.DeviceOption = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the detections as JSON (schema recnext.infer; masks as COCO RLE) instead of a table.",
    )] = False,
) -> None:
    """Run NAME on each IMAGE, write OUT/<image>.png with translucent masks, boxes, class names and scores, and list them.

    An image that cannot be read, or a folder or pattern with no image, gets a one-line error; the others are still
    processed, and the exit code is then 2.
    """
    from recnext_cli.pipelines import run_infer

    run = run_infer(name, images, checkpoint=checkpoint, config=config, out=out, score_thr=score_thr,
                    device=opt.device_name(device), on_error=print_error)
    report_drawings(run, score_thr, as_json)


def print_error(message: str) -> None:
    """One red `error:` line on stderr for an image that was not drawn; the run goes on with the others."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def report_drawings(run: Drawings, score_thr: float, as_json: bool) -> None:
    """The detections as a table and the drawings' paths, or with `as_json` as a recnext.infer document; then exit
    code 2 if an image was not drawn (its one-line error went out as it was met)."""
    if as_json:
        from recnext_cli.outputs import document, dumps

        records = [_as_record(result, path) for result, path in run.drawn]
        typer.echo(dumps(document("infer", score_threshold=score_thr, images=records)))
    else:
        _print_table(run.drawn, score_thr)
    if not run.complete:
        raise typer.Exit(2)


def _as_record(result, drawing_path: Path) -> dict:
    from recnext_cli.infer import mask_rle

    return {
        "image": str(result.image_path),
        "drawing": str(drawing_path),
        "width": result.width,
        "height": result.height,
        "detections": [
            {
                "class": detection.class_name,
                "class_id": detection.class_id,
                "score": detection.score,
                "box": list(detection.box),
                "mask_area": detection.mask_area,
                "mask": None if detection.mask is None else mask_rle(detection.mask),
            }
            for detection in result.detections
        ],
    }


def _print_table(drawn, score_thr: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="detections")
    for column, justify in (("image", "left"), ("class", "left"), ("score", "right"), ("box x0, y0, x1, y1", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for result, _ in drawn:
        if not result.detections:
            table.add_row(str(result.image_path), f"[dim]none above {score_thr}[/]", "", "", end_section=True)
        for index, detection in enumerate(result.detections):
            box = ", ".join(f"{value:.0f}" for value in detection.box)
            last = index == len(result.detections) - 1
            # Each image is named once, on its first row: a long path repeated per detection doubles the table.
            table.add_row(str(result.image_path) if index == 0 else "", detection.class_name, f"{detection.score:.3f}",
                          box, end_section=last)
    console = Console()
    console.print(table)
    for _, drawing_path in drawn:
        console.print(f"drawn: {drawing_path}", soft_wrap=True, highlight=False)
