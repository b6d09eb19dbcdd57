"""`recnext test`: evaluate a zoo model (or your config and checkpoint) on COCO val2017 with N workers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from recnext_cli.commands import _options as opt


def test(
    name: opt.ModelName,
    gpus: opt.Gpus = 1,
    data_root: opt.DataRoot = Path("data/coco"),
    checkpoint: opt.DetectorCheckpoint = None,
    metrics: Annotated[Optional[list[str]], typer.Option(
        "--eval", help="COCO metrics: bbox segm (also proposal, proposal_fast).  [default: bbox segm]",
        show_default=False,
    )] = None,
    eval_options: Annotated[Optional[list[str]], typer.Option(
        "--eval-options", help="KEY=VALUE ... for mmdet's dataset.evaluate (or, with --format-only, format_results), "
        "as mmdet's tools/test.py takes them, e.g. classwise=True.", show_default=False,
    )] = None,
    format_only: Annotated[bool, typer.Option(
        "--format-only", help="Write the predictions as COCO results JSON files (PREFIX.bbox.json, PREFIX.segm.json) "
        "instead of evaluating, e.g. for test-dev submissions; PREFIX is --eval-options jsonfile_prefix=PREFIX "
        "(default: work_dirs/NAME/results).",
    )] = False,
    show_dir: Annotated[Optional[Path], typer.Option(
        "--show-dir", help="Also draw each test image with its detections (as `recnext infer` draws) into this "
        "folder, one PNG per image.", show_default=False,
    )] = None,
    show_score_thr: Annotated[Optional[float], typer.Option(
        "--show-score-thr", help="Lowest score drawn with --show-dir.  [default: 0.3]", show_default=False,
    )] = None,
    device: opt.DeviceOption = None,
    nnodes: opt.Nnodes = 1,
    node_rank: opt.NodeRank = 0,
    master_addr: opt.MasterAddr = None,
    master_port: opt.MasterPort = None,
    launcher: opt.Launcher = None,
    partition: opt.Partition = None,
    srun_args: opt.SrunArgs = "",
    cfg_options: opt.CfgOptions = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Metrics JSON to write (default: work_dirs/NAME/test_result.json)", show_default=False,
    )] = None,
    dry_run: opt.DryRun = False,
    config: opt.Config = None,
    fuse_conv_bn: Annotated[bool, typer.Option(
        "--fuse-conv-bn", help="Fold every BatchNorm into a neighbouring conv before testing, as mmdet's tools/test.py "
        "does, for speed: a RecNeXt backbone through its own fuse (which folds more than mmcv's fuse_conv_bn), the "
        "rest with mmcv's. Metrics stay equal up to float rounding.",
    )] = False,
    fp16: Annotated[bool, typer.Option(
        "--fp16", help="Run the model in half precision the mmdet way (mmcv's wrap_fp16_model: autocast in the "
        "network, fp32 box decoding and NMS). CUDA only; metrics may differ slightly from fp32's.",
    )] = False,
    evaluator: Annotated[str, typer.Option(
        "--evaluator", help="COCO metric implementation: pycocotools (mmdet's own) or faster (faster-coco-eval's "
        "C++ COCOeval: the same metrics, evaluation nearly twice as fast; see benchmarks/coco_eval.py).",
    )] = "pycocotools",
    verbose: opt.Verbose = False,
) -> None:
    """Evaluate NAME on COCO val2017 with --gpus workers (torchrun, Slurm or one process) and print its README row.

    Before any worker starts, the checkpoint is downloaded and verified and the dataset layout is checked.
    Put NAME first: --eval and --cfg-options take every word that follows them, as in mmdet's tools.
    """
    from recnext_cli.jobs import LaunchOptions
    from recnext_cli.pipelines import run_test

    launch = LaunchOptions(gpus, opt.device_name(device), launcher, nnodes, node_rank, master_addr, master_port,
                           partition, srun_args)
    run_test(
        name, launch, data_root=data_root, checkpoint=checkpoint, metrics=metrics, eval_options=eval_options,
        format_only=format_only, show_dir=show_dir, show_score_thr=show_score_thr, cfg_options=cfg_options, out=out,
        dry_run=dry_run, config=config, fuse_conv_bn=fuse_conv_bn, fp16=fp16, evaluator=evaluator, verbose=verbose,
    )
