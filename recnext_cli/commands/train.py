"""`recnext train`: train a RecNeXt Mask R-CNN (the zoo's config or yours) from ImageNet weights with N workers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from recnext_cli.commands import _options as opt


def train(
    name: opt.ModelName,
    gpus: opt.Gpus = 1,
    data_root: opt.DataRoot = Path("data/coco"),
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
    batch_policy: opt.BatchPolicy = "accumulate",
    device: opt.DeviceOption = None,
    nnodes: opt.Nnodes = 1,
    node_rank: opt.NodeRank = 0,
    master_addr: opt.MasterAddr = None,
    master_port: opt.MasterPort = None,
    launcher: opt.Launcher = None,
    partition: opt.Partition = None,
    srun_args: opt.SrunArgs = "",
    cfg_options: opt.CfgOptions = None,
    dry_run: opt.DryRun = False,
    config: opt.Config = None,
    verbose: opt.Verbose = False,
) -> None:
    """Train NAME's Mask R-CNN on COCO train2017 with --gpus workers (torchrun, Slurm or one process).

    The ImageNet pretrain is downloaded and verified and the dataset layout is checked before any worker starts.
    By default each optimizer step sees the recipe's batch (16 images for the published runs, 8 GPUs x 2), with
    gradient accumulation when fewer workers take part; the run prints and records (work dir's batch.json) the
    batch and lr it uses. Checkpoints are written to a temporary name and renamed when complete, so --auto-resume after a killed job
    continues from the last complete one. Put NAME first: --cfg-options takes every word that follows it.
    """
    from recnext_cli.jobs import LaunchOptions
    from recnext_cli.pipelines import run_train

    launch = LaunchOptions(gpus, opt.device_name(device), launcher, nnodes, node_rank, master_addr, master_port,
                           partition, srun_args)
    run_train(
        name, launch, data_root=data_root, work_dir=work_dir, resume_from=resume_from, auto_resume=auto_resume,
        seed=seed, diff_seed=diff_seed, deterministic=deterministic, load_from=load_from, no_validate=no_validate,
        batch_policy=batch_policy, cfg_options=cfg_options, dry_run=dry_run, config=config, verbose=verbose,
    )
