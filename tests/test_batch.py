"""The recipe's images per optimizer step on any worker count: the plan, and accumulation against real gloo workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recnext_cli.errors import UsageError
from recnext_cli.runners.batch import plan_batch


def test_accumulation_reaches_the_published_batch_from_four_workers():
    plan = plan_batch("accumulate", workers=4, images_per_worker=2, recipe_batch=16, recipe_lr=2e-4)
    assert (plan.accumulation, plan.effective_batch, plan.lr) == (2, 16, 2e-4)
    assert "4 worker(s) x 2 image(s) x 2 accumulation step(s) = 16 images per optimizer step" in plan.summary()


def test_eight_workers_need_no_accumulation_and_one_worker_needs_eight_steps():
    assert plan_batch("accumulate", 8, 2, 16, 2e-4).accumulation == 1
    assert plan_batch("accumulate", 1, 2, 16, 2e-4).accumulation == 8


def test_a_worker_count_that_does_not_divide_the_batch_is_refused_with_the_alternatives():
    with pytest.raises(UsageError, match=r"3 worker\(s\) x 2 image\(s\) = 6 does not divide .* 16.*linear-lr"):
        plan_batch("accumulate", 3, 2, 16, 2e-4)


def test_linear_lr_scales_the_lr_by_actual_over_recipe_batch():
    plan = plan_batch("linear-lr", 3, 2, 16, 2e-4)
    assert plan.accumulation == 1
    assert plan.lr == pytest.approx(2e-4 * 6 / 16)


def test_as_configured_changes_nothing():
    plan = plan_batch("as-configured", 4, 2, 16, 2e-4)
    assert (plan.accumulation, plan.effective_batch, plan.lr) == (1, 8, 2e-4)


# One optimizer step on fixed data: no flips, no shuffling, samplers that take every anchor and proposal (no random
# draws), and SGD without clipping (AdamW's first step is lr x sign(gradient), and clipping to a norm, would hide a
# gradient off by a factor).
ONE_STEP = ["runner.max_epochs=1", "data.train_dataloader.shuffle=False", "data.train.pipeline.3.flip_ratio=0.0",
            "model.train_cfg.rpn.sampler.num=100000", "model.train_cfg.rcnn.sampler.num=100000",
            "optimizer.type=SGD", "optimizer.lr=1.0", "optimizer_config.grad_clip=None"]


def _train_one_step(work_dir: Path, workers: int, root: Path, start: Path, *overrides: str) -> tuple[dict, dict]:
    """(weights after the run, its batch.json) of `recnext train` of the demo model from the weights in `start`, with
    ONE_STEP's settings; the run's log must say it loaded all of `start`, so `start` holds its weights before the step."""
    import torch

    from tests.conftest import TINY, recnext

    result = recnext("train", "tiny", "--config", str(TINY), "--device", "cpu", "--gpus", str(workers),
                     "--data-root", str(root), "--work-dir", str(work_dir), "--no-validate", "--load-from", str(start),
                     "--cfg-options", *ONE_STEP, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    (log,) = [path for path in work_dir.glob("*.log") if not path.name.startswith("train-workers-")]  # mmdet's
    text = log.read_text()
    # mmdet loads `load_from` after init_weights; mmcv loads it non-strictly and only warns about keys it could not.
    assert f"load checkpoint from local path: {start.resolve()}" in text
    assert "do not match exactly" not in text, text[text.index("do not match exactly") - 200:][:4000]
    state = torch.load(work_dir / "epoch_1.pth", map_location="cpu", weights_only=False)["state_dict"]
    return _compared(state), json.loads((work_dir / "batch.json").read_text())


def _compared(state: dict) -> dict:
    """The weights the test compares: every floating-point tensor of `state` but BatchNorm's running statistics."""
    return {key: value for key, value in state.items() if value.is_floating_point() and "running" not in key}


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> tuple[Path, dict]:
    """(checkpoint, its weights) of the demo model as built and initialised, without training: where both runs start."""
    pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")
    import torch
    from mmcv import Config
    from mmdet.models import build_detector

    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones)
    from tests.conftest import TINY

    cfg = Config.fromfile(str(TINY))
    torch.manual_seed(0)  # the same start on every run, so a failure reproduces
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    path = tmp_path_factory.mktemp("start") / "initial.pth"
    torch.save({"meta": {}, "state_dict": state}, path)  # mmcv's checkpoint layout
    return path, _compared(state)


@pytest.mark.slow
# 8 images: 1 worker accumulating 4 micro-batches against 2 gloo workers accumulating 2 each, so both the single
# worker's accumulation and accumulation across DDP workers (no_sync) are held to the same one-step update. (4, 2, 1),
# 2 workers without accumulation, adds nothing the e2e training tests do not run.
@pytest.mark.parametrize("images, one_worker_steps, two_worker_steps", [(8, 4, 2)])
def test_one_worker_accumulating_updates_the_weights_as_two_gloo_workers_do(
    tmp_path, initial_weights, images, one_worker_steps, two_worker_steps
):
    """1 worker x 2 images x k steps against 2 gloo workers x 2 images x k/2 steps: one optimizer step each, the
    recipe's batch being all the images.

    The single worker reads the images in an order that makes its micro-batches the two workers' batches, so
    BatchNorm (plain, per worker, on CPU) sees the same 2-image batches.
    """
    from recnext_cli.synthetic import make_synthetic_coco

    two_workers_root = make_synthetic_coco(tmp_path / "coco", train_images=images, val_images=2).root
    # Without shuffling, rank r of two reads images r, r + 2, r + 4, ...; one worker reads them in file order.
    one_worker_root = tmp_path / "coco-interleaved"
    shutil.copytree(two_workers_root, one_worker_root)
    ann_file = one_worker_root / "annotations" / "instances_train2017.json"
    document = json.loads(ann_file.read_text())
    document["images"] = [document["images"][b + i] for b in range(0, images, 4) for i in (0, 2, 1, 3)]
    ann_file.write_text(json.dumps(document))

    recipe = f"auto_scale_lr.base_batch_size={images}"
    start, initial = initial_weights
    accumulated, accumulated_plan = _train_one_step(tmp_path / "one", 1, one_worker_root, start, recipe)
    distributed, distributed_plan = _train_one_step(tmp_path / "two", 2, two_workers_root, start, recipe)

    assert (accumulated_plan["workers"], accumulated_plan["accumulation"]) == (1, one_worker_steps)
    assert (distributed_plan["workers"], distributed_plan["accumulation"]) == (2, two_worker_steps)
    assert accumulated_plan["effective_batch"] == distributed_plan["effective_batch"] == images
    # Each weight compared came from the start checkpoint and each of its weights is compared: `initial` is the start.
    assert accumulated.keys() == distributed.keys() == initial.keys()
    update = max((distributed[key] - initial[key]).abs().max().item() for key in distributed)
    difference = max((accumulated[key] - distributed[key]).abs().max().item() for key in distributed)
    assert update > 1e-3  # the step moved the weights, so agreeing below means something
    assert difference < 1e-5, f"largest difference {difference} (largest update {update})"


def _tiny_model():
    """A real torch module with mmcv's train_step: the loss is its one weight times the batch."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def train_step(self, batch, optimizer):
            loss = (self.weight * batch).sum()
            return {"loss": loss, "log_vars": {"loss": float(loss.detach())}, "num_samples": 1}

    return Tiny()


@pytest.fixture
def no_epoch_pause(monkeypatch):
    """mmcv's EpochBasedRunner sleeps 2 s at each epoch start (a guard for data loader workers, which these runs do
    not have): its module gets a `time` whose sleep returns at once, the rest of the process keeps the real one."""
    import types

    epoch_based_runner = pytest.importorskip("mmcv.runner.epoch_based_runner")
    quick = types.SimpleNamespace(**{name: getattr(epoch_based_runner.time, name) for name in dir(epoch_based_runner.time)
                                     if not name.startswith("__")})
    quick.sleep = lambda seconds: None
    monkeypatch.setattr(epoch_based_runner, "time", quick)


def _lr_per_step(tmp_path, micro_batches: int, accumulation: int, epochs: int = 3) -> list[float]:
    """The lr each optimizer step used, running mmcv's EpochBasedRunner with recnext's hooks as the config sets them."""
    import logging

    import torch
    from mmcv import Config
    from mmcv.runner import EpochBasedRunner, Hook

    from recnext_cli.runners.batch import apply_plan, plan_batch

    cfg = Config(dict(
        optimizer=dict(type="SGD", lr=0.1), optimizer_config=dict(grad_clip=None), runner=dict(type="EpochBasedRunner"),
        lr_config=dict(policy="step", warmup="linear", warmup_iters=4, warmup_ratio=0.01, step=[2]),
    ))
    apply_plan(cfg, plan_batch("accumulate", 1, 1, accumulation, 0.1))
    model = _tiny_model()
    runner = EpochBasedRunner(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), work_dir=str(tmp_path),
                              logger=logging.getLogger("recnext-test"), max_epochs=epochs)
    runner.register_training_hooks(cfg.lr_config, cfg.optimizer_config)
    steps = []

    class RecordSteps(Hook):
        def before_run(self, runner):
            original = runner.optimizer.step

            def step(*args, **kwargs):
                steps.append(runner.optimizer.param_groups[0]["lr"])
                return original(*args, **kwargs)

            runner.optimizer.step = step

    runner.register_hook(RecordSteps())
    runner.run([[torch.ones(1)] * micro_batches], [("train", 1)])
    return steps


def test_accumulated_steps_follow_the_unaccumulated_lr_schedule_step_for_step(tmp_path, no_epoch_pause):
    pytest.importorskip("mmcv", reason="needs mmcv (make setup)")
    # 6 micro-batches of an epoch in groups of 2 are 3 steps, as 3 batches without accumulation: warm-up over 4 steps
    # (so into epoch 2), decay after epoch 2. The step-counting hooks must give every step the same lr.
    published = _lr_per_step(tmp_path / "a", micro_batches=3, accumulation=1)
    accumulated = _lr_per_step(tmp_path / "b", micro_batches=6, accumulation=2)
    assert len(published) == 9 and accumulated == pytest.approx(published)
    assert published[0] < published[3] and published[-1] == pytest.approx(0.01)


def test_an_epoch_whose_length_is_not_a_multiple_ends_with_a_shorter_step(tmp_path, no_epoch_pause):
    pytest.importorskip("mmcv", reason="needs mmcv (make setup)")
    # 5 micro-batches in groups of 2: steps after micro-batches 2, 4 and 5 of every epoch, so checkpoints written at
    # epoch ends hold no half-summed gradient; the schedule sees 3 steps per epoch, like 3 unaccumulated batches.
    assert _lr_per_step(tmp_path / "c", micro_batches=5, accumulation=2) == pytest.approx(
        _lr_per_step(tmp_path / "d", micro_batches=3, accumulation=1))
