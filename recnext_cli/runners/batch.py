"""The effective batch of a training run: how many images each optimizer step sees, and how recnext keeps the recipe's."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from recnext_cli.errors import UsageError

# The published runs: 8 GPUs x 2 images. A config may name another in mmdet's own key, auto_scale_lr.base_batch_size.
PUBLISHED_BATCH = 16
BATCH_POLICIES = ("accumulate", "linear-lr", "as-configured")
BATCH_FILE = "batch.json"


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    policy: str
    workers: int
    images_per_worker: int
    accumulation: int
    recipe_batch: int
    recipe_lr: float
    lr: float

    @property
    def effective_batch(self) -> int:
        return self.workers * self.images_per_worker * self.accumulation

    def summary(self) -> str:
        return (
            f"batch: {self.workers} worker(s) x {self.images_per_worker} image(s) x {self.accumulation} accumulation "
            f"step(s) = {self.effective_batch} images per optimizer step (recipe: {self.recipe_batch}); "
            f"lr {self.lr:g} (recipe: {self.recipe_lr:g}; --batch-policy {self.policy})"
        )


def plan_batch(policy: str, workers: int, images_per_worker: int, recipe_batch: int, recipe_lr: float) -> BatchPlan:
    """How to run `workers` x `images_per_worker` against a recipe tuned for `recipe_batch` images at `recipe_lr`.

    accumulate: sum the gradients of several micro-batches per optimizer step until the recipe's batch is reached;
    linear-lr: one step per micro-batch, the lr scaled by actual/recipe batch (mmdet's auto_scale_lr);
    as-configured: neither.
    """
    if policy not in BATCH_POLICIES:
        raise UsageError(f"--batch-policy {policy}: use one of {', '.join(BATCH_POLICIES)}")
    per_step = workers * images_per_worker
    accumulation, lr = 1, recipe_lr
    if policy == "accumulate":
        if recipe_batch % per_step:
            raise UsageError(
                f"{workers} worker(s) x {images_per_worker} image(s) = {per_step} does not divide the recipe's batch "
                f"of {recipe_batch}, so accumulation cannot reach it; choose --gpus so that it does, or pass "
                "--batch-policy linear-lr (lr scaled to the batch) or --batch-policy as-configured"
            )
        accumulation = recipe_batch // per_step
    elif policy == "linear-lr":
        lr = recipe_lr * per_step / recipe_batch
    return BatchPlan(policy, workers, images_per_worker, accumulation, recipe_batch, recipe_lr, lr)


def images_per_worker(cfg) -> int:
    """Images per worker per iteration, where mmdet 2.28 reads it (train_dataloader wins over data.samples_per_gpu)."""
    return int(cfg.data.get("train_dataloader", {}).get("samples_per_gpu", cfg.data.samples_per_gpu))


def recipe_batch(cfg) -> int:
    return int(cfg.get("auto_scale_lr", {}).get("base_batch_size", PUBLISHED_BATCH))


def apply_plan(cfg, plan: BatchPlan) -> None:
    """Point `cfg` at `plan`: the lr in use, and with accumulation the optimizer and lr hooks that count steps."""
    cfg.optimizer.lr = plan.lr
    # recnext has scaled the lr already (or chosen not to): mmdet's train_detector must not scale it again.
    if "auto_scale_lr" in cfg:
        cfg.auto_scale_lr.enable = False
    if plan.accumulation == 1:
        return
    if cfg.runner.type != "EpochBasedRunner":
        raise UsageError(
            f"gradient accumulation needs an EpochBasedRunner (checkpoints at epoch ends, which are step boundaries); "
            f"this config uses {cfg.runner.type}: pass --batch-policy linear-lr or --batch-policy as-configured"
        )
    if cfg.get("fp16") is not None:
        raise UsageError(
            "gradient accumulation is not available with an fp16 config; pass --batch-policy linear-lr, or remove fp16"
        )
    from recnext_cli.runners.accumulate import register_hooks

    optimizer_type, lr_policy = register_hooks(cfg.lr_config.policy if cfg.lr_config else None)
    cfg.optimizer_config = dict(cfg.optimizer_config, type=optimizer_type, accumulation=plan.accumulation)
    if cfg.lr_config:
        cfg.lr_config.policy = lr_policy
        cfg.lr_config.accumulation = plan.accumulation


def record_plan(work_dir: Path, plan: BatchPlan) -> Path:
    """Write `plan` as work_dir/batch.json (in one step), so a finished run says which batch and lr it used."""
    path = work_dir / BATCH_FILE
    document = {**dataclasses.asdict(plan), "effective_batch": plan.effective_batch}
    with tempfile.NamedTemporaryFile("w", dir=work_dir, prefix=f".{BATCH_FILE}.", delete=False) as file:
        file.write(json.dumps(document, indent=2) + "\n")
    os.replace(file.name, path)
    return path
