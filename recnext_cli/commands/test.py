"""`recnext test`: evaluate a zoo model (or your config and checkpoint) on COCO val2017 with N workers."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from recnext_cli.commands._options import (
    CfgOptions,
    Config,
    DataRoot,
    DetectorCheckpoint,
    Device,
    DryRun,
    Gpus,
    Launcher,
    MasterAddr,
    MasterPort,
    ModelName,
    Nnodes,
    NodeRank,
    Partition,
    SrunArgs,
    Verbose,
)
from recnext_cli.jobs import (
    checked_dataset,
    launch_options,
    local_checkpoint,
    model_files,
    on_this_machine,
    run_or_show,
    worker_log,
)

# What mmdet 2.28's CocoDataset.evaluate computes.
COCO_METRICS = ("bbox", "segm", "proposal", "proposal_fast")
FP16_ON_CPU = ("--fp16 runs on CUDA only (mmcv's fp16 mode autocasts through torch.cuda.amp); "
               "drop --fp16 to test on the CPU")


def test(
    name: ModelName,
    gpus: Gpus = 1,
    data_root: DataRoot = Path("data/coco"),
    checkpoint: DetectorCheckpoint = None,
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
    device: Device = None,
    nnodes: Nnodes = 1,
    node_rank: NodeRank = 0,
    master_addr: MasterAddr = None,
    master_port: MasterPort = None,
    launcher: Launcher = None,
    partition: Partition = None,
    srun_args: SrunArgs = "",
    cfg_options: CfgOptions = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Metrics JSON to write (default: work_dirs/NAME/test_result.json)", show_default=False,
    )] = None,
    dry_run: DryRun = False,
    config: Config = None,
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
    verbose: Verbose = False,
) -> None:
    """Evaluate NAME on COCO val2017 with --gpus workers (torchrun, Slurm or one process) and print its README row.

    Before any worker starts, the checkpoint is downloaded and verified and the dataset layout is checked.
    Put NAME first: --eval and --cfg-options take every word that follows them, as in mmdet's tools.
    """
    from recnext_cli.compat.evaluator import EVALUATORS
    from recnext_cli.errors import UsageError

    if format_only and (metrics or out):
        raise UsageError(
            f"--format-only writes COCO results files instead of evaluating; drop {'--eval' if metrics else '--out'}, "
            "or drop --format-only to compute metrics"
        )
    if show_score_thr is not None and show_dir is None:
        raise UsageError("--show-score-thr sets what --show-dir draws; add --show-dir DIR")
    malformed = [option for option in eval_options or [] if "=" not in option]
    if malformed:
        raise UsageError(f"--eval-options {' '.join(malformed)}: write each as KEY=VALUE (e.g. classwise=True)")
    metrics = metrics or ["bbox", "segm"]
    unknown = [metric for metric in metrics if metric not in COCO_METRICS]
    if unknown:
        raise UsageError(f"--eval {' '.join(unknown)}: COCO metrics are {', '.join(COCO_METRICS)}")
    if evaluator not in EVALUATORS:
        raise UsageError(f"--evaluator {evaluator}: use one of {', '.join(EVALUATORS)}")
    notes: list[str] = []
    topology = launch_options(gpus, device, launcher, nnodes, node_rank, master_addr, master_port, partition, srun_args)
    if fp16 and topology.device == "cpu":
        raise UsageError(FP16_ON_CPU)
    config_path, checkpoint = model_files(name, config, checkpoint, dry_run, notes)
    data_root = checked_dataset(data_root, "test", dry_run, notes)
    topology = on_this_machine(topology, dry_run)
    if fp16 and topology.device != "cuda":
        raise UsageError(FP16_ON_CPU)
    checkpoint_path = local_checkpoint(checkpoint, dry_run, notes)
    out = (out or Path("work_dirs") / name / "test_result.json").resolve()
    runner_args = [
        str(config_path), "--checkpoint", str(checkpoint_path), "--data-root", str(data_root),
        "--device", topology.device, "--model-name", name, "--out", str(out), "--eval", *metrics,
    ]
    runner_args += [flag for flag, on in (("--fuse-conv-bn", fuse_conv_bn), ("--fp16", fp16)) if on]
    if evaluator != "pycocotools":
        runner_args += ["--evaluator", evaluator]
    eval_options = list(eval_options or [])
    prefix = None
    if format_only:
        given = [option.split("=", 1)[1] for option in eval_options if option.startswith("jsonfile_prefix=")]
        prefix = Path(given[-1] if given else Path("work_dirs") / name / "results").resolve()
        eval_options = [option for option in eval_options if not option.startswith("jsonfile_prefix=")]
        eval_options.append(f"jsonfile_prefix={prefix}")
        runner_args.append("--format-only")
    if eval_options:
        runner_args += ["--eval-options", *eval_options]
    if show_dir:
        runner_args += ["--show-dir", str(show_dir.resolve())]
        if show_score_thr is not None:
            runner_args += ["--show-score-thr", str(show_score_thr)]
    if cfg_options:
        runner_args += ["--cfg-options", *cfg_options]
    from recnext_cli.launch.supervise import RUN_RESULT

    # The workers' output is kept beside what the run writes: the metrics JSON, or the COCO results files.
    log_path = worker_log((prefix or out).parent, "test")
    with tempfile.TemporaryDirectory(prefix="recnext-test-") as run_dir:
        run_or_show("test", runner_args, topology, notes, dry_run, Path(run_dir), verbose=verbose, log_path=log_path)
        if dry_run:
            return
        if prefix:
            typer.echo(f"COCO results files: {prefix}.bbox.json, {prefix}.segm.json (rank 0's machine)", err=True)
        else:
            show_result(out, Path(run_dir) / RUN_RESULT, topology)
        if show_dir:
            typer.echo(f"drawn detections in {show_dir.resolve()} (rank 0's machine)", err=True)


def show_result(out: Path, run_result: Path, topology) -> None:
    """Print the README-format row of this run's metrics: rank 0's copy in the run folder when rank 0 ran on this
    machine, else --out (Slurm: written on the job's first node, found here on a shared disk)."""
    from recnext_cli import results
    from recnext_cli.errors import UsageError

    if topology.launcher == "pytorch" and topology.node_rank != 0:
        return  # rank 0 runs on node 0, which prints the table
    source = run_result if run_result.is_file() else out
    if not source.is_file():
        raise UsageError(
            f"the job finished, but its metrics file {out} is not on this machine: rank 0 wrote it on the job's "
            "first node; pass an --out on a disk this machine shares with it, or copy the file here and run "
            "`recnext results` on it"
        )
    metrics = json.loads(source.read_text())["metrics"]
    if all(key in metrics for key in results.METRICS):
        # The run folder goes when the command ends: the row links to --out, which holds the same record.
        record = dataclasses.replace(results.read_result_file(source), source=out)
        typer.echo(results.markdown_table([record]), nl=False)
    else:
        # The README row needs both bbox and segm; with fewer metrics, show what was computed.
        for key, value in metrics.items():
            typer.echo(f"{key}: {value}")
    typer.echo(f"metrics written to {out}", err=True)
