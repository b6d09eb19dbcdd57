"""`recnext demo`: the whole cycle on an embedded default: synthetic COCO set, 2-worker CPU train, test, a drawing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from recnext_cli.commands._options import Verbose

DEMO_NAME = "m0-shapes"


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the dataset, checkpoints, metrics and drawing.")]
    = Path("demo_out"),
    workers: Annotated[int, typer.Option("--workers", min=1, help="CPU worker processes (gloo) for train and test.")]
    = 2,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs of 48 images per worker.")] = 4,
    verbose: Verbose = False,
) -> None:
    """Train, test and draw on CPU in a few minutes: synthetic COCO set, README-format table, a picture.

    Makes a seeded synthetic COCO set, trains RecNeXt-M0 Mask R-CNN on it with torchrun and gloo workers, evaluates
    it, prints the README-format table and draws the detections on a validation image. Everything it writes goes
    under --out; a second run reuses the dataset and trains again from scratch.
    """
    from rich.console import Console

    from recnext_cli.commands.infer import SCORE_THR, print_error, report_drawings
    from recnext_cli.jobs import LaunchOptions
    from recnext_cli.pipelines import run_infer, run_test, run_train
    from recnext_cli.synthetic import DEFAULT_CLASSES, make_synthetic_coco
    from recnext_cli.zoo import CONFIG_ROOT

    # RecNeXt-M0 Mask R-CNN shrunk to the synthetic shapes; the tests train the same config.
    demo_config = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"

    console = Console(stderr=True, highlight=False)
    out = out.resolve()
    started = time.monotonic()
    data_root = out / "data"
    if not (data_root / "annotations" / "instances_val2017.json").exists():
        console.rule("1/4 synthetic COCO dataset")
        info = make_synthetic_coco(data_root, train_images=96, val_images=16, classes=DEFAULT_CLASSES, seed=0)
        console.print(f"{info.images['train2017']} train / {info.images['val2017']} val images of "
                      f"{', '.join(info.classes)} in {data_root}")
    work_dir = out / "train"
    workers_on_cpu = LaunchOptions(gpus=workers, device="cpu")
    console.rule(f"2/4 training {DEMO_NAME} with {workers} CPU workers")
    run_train(DEMO_NAME, workers_on_cpu, data_root=data_root, work_dir=work_dir, config=demo_config,
              cfg_options=[f"runner.max_epochs={epochs}"], verbose=verbose)
    console.rule(f"3/4 testing with {workers} CPU workers")
    run_test(DEMO_NAME, workers_on_cpu, data_root=data_root, checkpoint=work_dir / "latest.pth", config=demo_config,
             out=out / "test_result.json", verbose=verbose)
    console.rule("4/4 drawing detections")
    image = sorted((data_root / "val2017").glob("*.png"))[0]
    drawings = run_infer(DEMO_NAME, [image], checkpoint=work_dir / "latest.pth", config=demo_config,
                         out=out / "drawings", score_thr=SCORE_THR, device="cpu", on_error=print_error)
    report_drawings(drawings, SCORE_THR, as_json=False)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s; drawing: {out / 'drawings' / (image.stem + '.png')}")
