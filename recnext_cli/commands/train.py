"""`recnext train`: train a RecNeXt Mask R-CNN (the zoo's config or yours) from ImageNet weights with N workers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from recnext_cli.commands._options import (
    CfgOptions,
    Config,
    DataRoot,
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
    checked_name,
    existing_file,
    fetched,
    launch_options,
    on_this_machine,
    run_or_show,
    worker_log,
)


BatchPolicy = Annotated[str, typer.Option(
    "--batch-policy", help="How to keep the recipe's images per optimizer step (16 for the published runs) with "
    "your worker count: accumulate (sum the gradients of several iterations per step; the count must divide "
    "it), linear-lr (one step per iteration, lr x actual/recipe batch, mmdet's auto_scale_lr) or as-configured.",
)]


def model_files(name: str, config: Path | None, dry_run: bool, notes: list[str]):
    """(config, zoo pretrain record or None) for NAME: the zoo's, or your config with the zoo pretrain when NAME is in
    the zoo. Checks the name before your config file, and downloads nothing."""
    from recnext_cli import zoo
    from recnext_cli.errors import UnknownModelError

    checked_name(name)
    try:
        record = zoo.get_checkpoint(name, pretrain=True)
    except UnknownModelError:
        if config is None:
            raise
        record = None
    if config:
        config = existing_file(config, "--config", dry_run, notes)
        if record is None:
            notes.append(f"{name!r} is not in the zoo: the backbone starts from what {config.name} itself says")
    return config or zoo.config_path(name), record


def train(
    name: ModelName,
    gpus: Gpus = 1,
    data_root: DataRoot = Path("data/coco"),
    work_dir: Annotated[Optional[Path], typer.Option(
        "--work-dir", help="Checkpoints, mmdet's .log and .log.json, config dump (default: work_dirs/NAME)",
        show_default=False,
    )] = None,
    resume_from: Annotated[Optional[Path], typer.Option(
        "--resume-from", help="Continue from this checkpoint (weights, optimizer, epoch).", show_default=False,
    )] = None,
    auto_resume: Annotated[bool, typer.Option(
        "--auto-resume", help="Continue from the work dir's last complete checkpoint, if there is one.",
    )] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of every worker.")] = 0,
    diff_seed: Annotated[bool, typer.Option(
        "--diff-seed", help="Give each worker its own seed (seed + rank), as mmdet's tools/train.py --diff-seed.",
    )] = False,
    deterministic: Annotated[bool, typer.Option(
        "--deterministic", help="Deterministic cuDNN kernels (slower), as mmdet's tools/train.py --deterministic.",
    )] = False,
    load_from: Annotated[Optional[Path], typer.Option(
        "--load-from", help="Start from these detector weights (no optimizer state; epoch 1), unlike --resume-from.",
        show_default=False,
    )] = None,
    no_validate: Annotated[bool, typer.Option(
        "--no-validate", help="Do not evaluate on val2017 during training.",
    )] = False,
    batch_policy: BatchPolicy = "accumulate",
    device: Device = None,
    nnodes: Nnodes = 1,
    node_rank: NodeRank = 0,
    master_addr: MasterAddr = None,
    master_port: MasterPort = None,
    launcher: Launcher = None,
    partition: Partition = None,
    srun_args: SrunArgs = "",
    cfg_options: CfgOptions = None,
    dry_run: DryRun = False,
    config: Config = None,
    verbose: Verbose = False,
) -> None:
    """Train NAME's Mask R-CNN on COCO train2017 with --gpus workers (torchrun, Slurm or one process).

    The ImageNet pretrain is downloaded and verified and the dataset layout is checked before any worker starts.
    By default each optimizer step sees the recipe's batch (16 images for the published runs, 8 GPUs x 2), with
    gradient accumulation when fewer workers take part; the run prints and records (work dir's batch.json) the
    batch and lr it uses. Checkpoints are written to a temporary name and renamed when complete, so --auto-resume after a killed job
    continues from the last complete one. Put NAME first: --cfg-options takes every word that follows it.
    """
    from recnext_cli.errors import UsageError
    from recnext_cli.runners.batch import BATCH_POLICIES

    if batch_policy not in BATCH_POLICIES:
        raise UsageError(f"--batch-policy {batch_policy}: use one of {', '.join(BATCH_POLICIES)}")
    if load_from and (resume_from or auto_resume):
        raise UsageError(
            "--load-from starts a new run from weights; --resume-from/--auto-resume continue one: pass one of them"
        )
    if resume_from and auto_resume:
        raise UsageError(
            "--resume-from and --auto-resume exclude each other: name a checkpoint, or let the work dir decide"
        )
    notes: list[str] = []
    topology = launch_options(gpus, device, launcher, nnodes, node_rank, master_addr, master_port, partition, srun_args)
    config_path, pretrain_record = model_files(name, config, dry_run, notes)
    if resume_from:
        resume_from = existing_file(resume_from, "--resume-from", dry_run, notes)
    if load_from:
        load_from = existing_file(load_from, "--load-from", dry_run, notes)
    data_root = checked_dataset(data_root, "train", dry_run, notes)
    topology = on_this_machine(topology, dry_run)
    pretrain = fetched(pretrain_record, dry_run, notes).resolve() if pretrain_record else None
    work_dir = (work_dir or Path("work_dirs") / name).resolve()
    runner_args = [
        str(config_path), "--data-root", str(data_root), "--device", topology.device,
        "--work-dir", str(work_dir), "--seed", str(seed), "--batch-policy", batch_policy,
    ]
    runner_args += [flag for flag, on in (
        ("--diff-seed", diff_seed), ("--deterministic", deterministic), ("--no-validate", no_validate)) if on]
    if load_from:
        runner_args += ["--load-from", str(load_from)]
    if pretrain:
        runner_args += ["--pretrain", str(pretrain)]
    if resume_from:
        runner_args += ["--resume-from", str(resume_from)]
    if auto_resume:
        runner_args.append("--auto-resume")
    if cfg_options:
        runner_args += ["--cfg-options", *cfg_options]
    if dry_run:
        notes.append(
            f"the run writes its merged config to {work_dir / config_path.name} and its batch plan to "
            f"{work_dir / 'batch.json'}; `recnext config {name} --gpus {gpus * nnodes}` (with the same --config, "
            "--batch-policy and --cfg-options) prints that config now"
        )
    with tempfile.TemporaryDirectory(prefix="recnext-train-") as run_dir:
        run_or_show("train", runner_args, topology, notes, dry_run, Path(run_dir), verbose=verbose,
                    log_path=worker_log(work_dir, "train"))
    if not dry_run:
        typer.echo(f"checkpoints and logs (mmdet's *.log.json included) in {work_dir}", err=True)
