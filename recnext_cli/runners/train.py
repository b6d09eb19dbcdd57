"""Worker of `recnext train`: one rank of mmdet's train_detector, with checkpoints that are never half-written."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from recnext_cli.runners import add_common_arguments, build_detector, load_config, prepare_worker, run_worker
from recnext_cli.runners.batch import BATCH_POLICIES, apply_plan, images_per_worker, plan_batch, recipe_batch, record_plan

STAGING_PREFIX = ".saving-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recnext_cli.runners.train", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--work-dir", required=True, type=Path, help="logs, config dump and checkpoints")
    parser.add_argument("--pretrain", help="ImageNet weights for the backbone (model.backbone.init_cfg.checkpoint)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume-from", help="checkpoint to continue from (weights, optimizer, epoch)")
    resume.add_argument("--auto-resume", action="store_true", help="continue from the work dir's last checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diff-seed", action="store_true", help="seed + rank on each worker (mmdet's --diff-seed)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic cuDNN kernels")
    parser.add_argument("--load-from", help="detector weights to start from (no optimizer state, epoch 0)")
    parser.add_argument("--no-validate", action="store_true", help="no evaluation during training")
    parser.add_argument("--batch-policy", choices=BATCH_POLICIES, default="accumulate",
                        help="how to meet the recipe's images per optimizer step with this many workers")
    return parser.parse_args(argv)


def link_latest(out_dir: str, filename: str) -> None:
    """Point out_dir/latest.pth at `filename` in one step (mmcv removes the old link first, then creates the new)."""
    staged = os.path.join(out_dir, f"{STAGING_PREFIX}latest.pth")
    if os.path.lexists(staged):
        os.remove(staged)
    os.symlink(filename, staged)
    os.replace(staged, os.path.join(out_dir, "latest.pth"))


class AtomicCheckpointMixin:
    """mmcv runners write a checkpoint straight to its final name: a job killed meanwhile leaves a torn file there,
    which `--auto-resume` would then pick. This saves into a staging folder beside it and renames when complete."""

    def save_checkpoint(self, out_dir, *args, create_symlink=True, **kwargs):
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=STAGING_PREFIX) as staging:
            super().save_checkpoint(staging, *args, create_symlink=False, **kwargs)
            (filename,) = os.listdir(staging)
            os.replace(os.path.join(staging, filename), os.path.join(out_dir, filename))
        if create_symlink:
            link_latest(out_dir, filename)


def atomic_runner_type(base_type: str) -> str:
    """Register (once) an mmcv runner type that is `base_type` with atomic checkpoint saving; return its name."""
    from mmcv.runner import RUNNERS

    name = f"Atomic{base_type}"
    if RUNNERS.get(name) is None:
        base = RUNNERS.get(base_type)
        RUNNERS.register_module(name=name, module=type(name, (AtomicCheckpointMixin, base), {}))
    return name


def remove_stale_staging(work_dir: Path) -> None:
    """Staging folders left by a job killed while saving: their checkpoints never became complete."""
    for stale in work_dir.glob(f"{STAGING_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def training_config(args: argparse.Namespace, world_size: int):
    """(config, batch plan) of a run of `world_size` workers with these runner arguments: what `recnext config` prints.

    Call after prepare_worker (or compat.apply_all and importing recnext_cli.models).
    """
    from recnext_cli.models import set_pretrain_checkpoint

    cfg = load_config(args.config, args.data_root, args.cfg_options)
    if args.pretrain:
        set_pretrain_checkpoint(cfg, args.pretrain)
    cfg.work_dir = str(args.work_dir)
    cfg.resume_from = args.resume_from
    cfg.auto_resume = args.auto_resume
    if args.load_from:
        cfg.load_from = args.load_from
    cfg.gpu_ids = range(world_size) if world_size > 1 else [0]
    plan = plan_batch(args.batch_policy, world_size, images_per_worker(cfg), recipe_batch(cfg), cfg.optimizer.lr)
    apply_plan(cfg, plan)
    return cfg, plan


def report_progress(cfg, rank: int, plan) -> None:
    """Rank 0 tells the launching `recnext` how the run goes (progress events in its run folder), not the config."""
    from recnext_cli.progress import ProgressWriter
    from recnext_cli.runners.progress_hook import progress_hook_config, route_progress_bars

    writer = ProgressWriter(rank)
    if not writer.active:
        return
    writer.emit("note", text=plan.summary())
    route_progress_bars(writer, "val")
    log_interval = cfg.get("log_config", {}).get("interval", 50)
    images_per_iter = plan.workers * plan.images_per_worker
    cfg.custom_hooks = [*cfg.get("custom_hooks", []), progress_hook_config(rank, images_per_iter, log_interval)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_worker(args.launcher)
    import torch.distributed as dist
    from mmdet import __version__ as mmdet_version
    from mmdet.apis import set_random_seed, train_detector
    from mmdet.datasets import build_dataset
    from mmdet.utils import get_root_logger, setup_multi_processes

    from recnext_cli import compat

    rank, world_size = compat.init_distributed(args.device)
    distributed = dist.is_initialized()
    cfg, plan = training_config(args, world_size)
    setup_multi_processes(cfg)
    cfg.runner.type = atomic_runner_type(cfg.runner.type)

    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    if rank == 0:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(args.work_dir)
        cfg.dump(str(args.work_dir / Path(args.config).name))
        record_plan(args.work_dir, plan)
        print(plan.summary(), flush=True)
    # Set after the dump, as mmdet's tools/train.py does: the dumped config is the recipe, not this machine's.
    cfg.device = args.device
    report_progress(cfg, rank, plan)
    seed = args.seed + rank if args.diff_seed else args.seed
    cfg.seed = seed
    if distributed:
        # Nobody writes into the work dir before rank 0 has created it and cleared what a killed job left behind.
        dist.barrier()
    logger = get_root_logger(log_file=str(args.work_dir / f"{timestamp}.log"), log_level=cfg.log_level)
    seeds = " (+ rank on each worker)" if args.diff_seed else ""
    logger.info(f"distributed: {distributed} ({world_size} x {args.device}), seed {args.seed}{seeds}")
    logger.info(plan.summary())
    set_random_seed(seed, deterministic=args.deterministic)

    model = build_detector(cfg, cfg.device)
    model.init_weights()
    datasets = [build_dataset(cfg.data.train)]
    model.CLASSES = datasets[0].CLASSES
    if cfg.checkpoint_config is not None:
        # As mmdet's tools/train.py: class names in every checkpoint, so testing it needs no dataset to name them.
        cfg.checkpoint_config.meta = {"mmdet_version": mmdet_version, "CLASSES": datasets[0].CLASSES}
    meta = {"seed": seed, "exp_name": Path(args.config).name, "config": cfg.pretty_text}
    train_detector(model, datasets, cfg, distributed=distributed, validate=not args.no_validate, timestamp=timestamp, meta=meta)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_worker(main))
