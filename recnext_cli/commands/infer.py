"""`recnext infer`: draw a detector's boxes, class names, scores and masks onto images and list the detections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from recnext_cli.commands.test import DetectorCheckpoint


def infer(
    name: Annotated[str, typer.Argument(
        help="Zoo model (m3, m4, m5, a3, a4, a5), or any label with both --config and --checkpoint.",
    )],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files (PNG, JPEG, ...).")],
    checkpoint: DetectorCheckpoint = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="Your mmdet config instead of the zoo model's (class names: checkpoint meta, else the config)",
        show_default=False,
    )] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the drawings, one PNG per image.")] = Path("recnext_infer"),
    score_thr: Annotated[float, typer.Option(
        "--score-thr", min=0.0, max=1.0, help="Keep detections scoring above this.",
    )] = 0.3,
    device: Annotated[Optional[Literal["cpu", "cuda"]], typer.Option(
        "--device", help="cuda or cpu (default: cuda when a GPU is visible)", show_default=False,
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the detections as JSON instead of a table.")] = False,
) -> None:
    """Run NAME on each IMAGE, write OUT/<image>.png with translucent masks, boxes, class names and scores, and list them.

    An image that cannot be read gets a one-line error; the others are still processed, and the exit code is then 2.
    """
    from rich.console import Console
    from rich.markup import escape

    from recnext_cli import infer as library
    from recnext_cli.commands.test import local_checkpoint, model_files
    from recnext_cli.errors import RecnextError, UsageError

    config_path, checkpoint = model_files(name, config, checkpoint, dry_run=False, notes=[])
    # Before anything is downloaded or built: a run with no image to read would do all that for nothing.
    if not any(path.is_file() for path in images):
        missing = images[0] if len(images) == 1 else f"any of {len(images)} paths (first: {images[0]})"
        raise UsageError(f"no image file at {missing}; check the path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder for the drawings")
    checkpoint_path = local_checkpoint(checkpoint, dry_run=False, notes=[])
    detector = library.load_detector(config_path, checkpoint_path, device)
    errors = Console(stderr=True, highlight=False)
    drawn: list[tuple[library.ImageResult, Path]] = []
    for image_path, file_name in zip(images, library.drawing_names(images)):
        try:
            image = library.load_image(image_path)
        except RecnextError as exc:
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            continue
        result = detector.detect(image, image_path, score_thr)
        drawing_path = out / file_name
        library.write_png(library.draw(image, result.detections), drawing_path)
        drawn.append((result, drawing_path))

    if as_json:
        typer.echo(json.dumps([_as_record(result, path) for result, path in drawn], indent=2))
    else:
        _print_table(drawn, score_thr)
    if len(drawn) < len(images):
        raise typer.Exit(2)


def _as_record(result, drawing_path: Path) -> dict:
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
            table.add_row(str(result.image_path), f"[dim]none above {score_thr}[/]", "", "")
        for detection in result.detections:
            box = ", ".join(f"{value:.0f}" for value in detection.box)
            table.add_row(str(result.image_path), detection.class_name, f"{detection.score:.3f}", box)
    console = Console()
    console.print(table)
    for _, drawing_path in drawn:
        console.print(f"drawn: {drawing_path}", soft_wrap=True, highlight=False)
