"""`recnext infer`: draw a detector's boxes, class names, scores and masks onto images and list the detections."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from recnext_cli.commands._options import DetectorCheckpoint

# What a folder given as IMAGE contributes: the files directly in it with these suffixes (any case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def infer(
    name: Annotated[str, typer.Argument(
        help="Zoo model (m3, m4, m5, a3, a4, a5), or any label with both --config and --checkpoint.",
    )],
    images: Annotated[list[Path], typer.Argument(
        metavar="IMAGE...",
        help="Image files (PNG, JPEG, ...), folders (the images directly in them) or quoted glob patterns "
        "('photos/**/*.jpg').",
    )],
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
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the detections as JSON (schema recnext.infer; masks as COCO RLE) instead of a table.",
    )] = False,
) -> None:
    """Run NAME on each IMAGE, write OUT/<image>.png with translucent masks, boxes, class names and scores, and list them.

    An image that cannot be read, or a folder or pattern with no image, gets a one-line error; the others are still
    processed, and the exit code is then 2.
    """
    from rich.console import Console
    from rich.markup import escape

    from recnext_cli import infer as library
    from recnext_cli.jobs import local_checkpoint, model_files
    from recnext_cli.errors import RecnextError, UsageError

    config_path, checkpoint = model_files(name, config, checkpoint, dry_run=False, notes=[])
    given, (images, unmatched) = images, expand_images(images)
    # Before anything is downloaded or built: a run with no image to read would do all that for nothing.
    if not any(path.is_file() for path in images):
        candidates = images or given
        missing = candidates[0] if len(candidates) == 1 else f"any of {len(candidates)} paths (first: {candidates[0]})"
        raise UsageError(f"no image file at {missing}; check the path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder for the drawings")
    checkpoint_path = local_checkpoint(checkpoint, dry_run=False, notes=[])
    detector = library.load_detector(config_path, checkpoint_path, device)
    errors = Console(stderr=True, highlight=False)
    for problem in unmatched:
        errors.print(f"[bold red]error:[/] {escape(problem)}", soft_wrap=True)
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
        from recnext_cli.outputs import document, dumps

        records = [_as_record(result, path) for result, path in drawn]
        typer.echo(dumps(document("infer", score_threshold=score_thr, images=records)))
    else:
        _print_table(drawn, score_thr)
    if len(drawn) < len(images) or unmatched:
        raise typer.Exit(2)


def expand_images(arguments: list[Path]) -> tuple[list[Path], list[str]]:
    """IMAGE arguments as files, in order, each once, and a message for each folder or pattern that gave none.

    A folder gives the image files directly in it, a pattern with * ? or [ its matching files (** spans folders),
    both sorted by name; anything else stays as given, so that a missing file is reported when it is read.
    """
    expanded: dict[Path, None] = {}
    problems = []
    for argument in arguments:
        if argument.is_dir():
            found = sorted(
                path for path in argument.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            )
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                problems.append(f"no image file in the folder {argument} (looked for {suffixes})")
        elif any(character in str(argument) for character in "*?["):
            found = sorted(Path(match) for match in glob.glob(str(argument), recursive=True) if Path(match).is_file())
            if not found:
                problems.append(f"no file matches {argument}; check the pattern")
        else:
            found = [argument]
        expanded.update(dict.fromkeys(found))
    return list(expanded), problems


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
