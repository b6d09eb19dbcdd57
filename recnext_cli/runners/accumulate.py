"""Gradient accumulation for mmcv's EpochBasedRunner, with the lr schedule counted in optimizer steps.

mmcv 1.7's GradientCumulativeOptimizerHook groups micro-batches over the whole run, not per epoch: with an epoch
length that is not a multiple of the group size, a group straddles an epoch end, so the checkpoint written there
loses the gradients summed so far, and its remainder arithmetic is wrong after a resume. Here every epoch starts a new
group and its last, shorter group is a step of its own, so each epoch end (every checkpoint) is a step boundary.
mmcv's lr hooks count runner iterations (micro-batches); they see the run through StepsView, where one iteration is
one optimizer step, so a 500-iteration warm-up means 500 steps as in the published 8 x 2 run.
"""

from __future__ import annotations

import math

from recnext_cli.errors import UsageError

OPTIMIZER_HOOK = "AccumulatingOptimizerHook"


class StepsView:
    """`runner` as its lr hook should see it: iterations are optimizer steps, an epoch is its number of steps."""

    def __init__(self, runner, accumulation: int):
        self._runner = runner
        self._steps_per_epoch = math.ceil(len(runner.data_loader) / accumulation)
        self._accumulation = accumulation

    def __getattr__(self, name):
        return getattr(self._runner, name)

    @property
    def iter(self) -> int:
        return self._runner.epoch * self._steps_per_epoch + self._runner.inner_iter // self._accumulation

    @property
    def max_iters(self) -> int:
        return self._runner.max_epochs * self._steps_per_epoch

    @property
    def data_loader(self):
        # Only its length is read (warm-up given in epochs): a step per group of micro-batches.
        return range(self._steps_per_epoch)


def step_group(runner, accumulation: int) -> tuple[int, int]:
    """(first micro-batch, number of micro-batches) of the optimizer step that this iteration belongs to."""
    first = runner.inner_iter // accumulation * accumulation
    return first, min(accumulation, len(runner.data_loader) - first)


def optimizer_hook_class():
    from mmcv.runner import OptimizerHook

    class AccumulatingOptimizerHook(OptimizerHook):
        """One optimizer step per `accumulation` micro-batches (fewer for an epoch's last group): the mean loss over
        the group's images, gradients reduced across workers once, clipped once, one step."""

        def __init__(self, accumulation: int, **kwargs):
            super().__init__(**kwargs)
            self.accumulation = accumulation

        def before_train_iter(self, runner):
            first, size = step_group(runner, self.accumulation)
            if hasattr(runner.model, "require_backward_grad_sync"):
                # DDP's no_sync: all-reduce only the backward pass that completes the group's sum.
                runner.model.require_backward_grad_sync = runner.inner_iter == first + size - 1

        def after_train_iter(self, runner):
            first, size = step_group(runner, self.accumulation)
            if runner.inner_iter == first:
                runner.optimizer.zero_grad()
            (runner.outputs["loss"] / size).backward()
            if runner.inner_iter < first + size - 1:
                return
            if self.grad_clip is not None:
                grad_norm = self.clip_grads(runner.model.parameters())
                if grad_norm is not None:
                    runner.log_buffer.update({"grad_norm": float(grad_norm)}, runner.outputs["num_samples"])
            runner.optimizer.step()

    return AccumulatingOptimizerHook


def lr_hook_class(base):
    class StepCountingLrHook(base):
        def __init__(self, accumulation: int, **kwargs):
            self.accumulation = accumulation
            super().__init__(**kwargs)

        def before_train_epoch(self, runner):
            super().before_train_epoch(StepsView(runner, self.accumulation))

        def before_train_iter(self, runner):
            super().before_train_iter(StepsView(runner, self.accumulation))

    return StepCountingLrHook


def register_hooks(lr_policy: str | None) -> tuple[str, str | None]:
    """Register (once) the optimizer hook and a step-counting version of `lr_policy`'s hook with mmcv.

    Returns the optimizer hook's type and the lr policy name to put in the config (mmcv appends LrUpdaterHook).
    """
    from mmcv.runner import HOOKS

    if HOOKS.get(OPTIMIZER_HOOK) is None:
        HOOKS.register_module(name=OPTIMIZER_HOOK, module=optimizer_hook_class())
    if lr_policy is None:
        return OPTIMIZER_HOOK, None
    # mmcv's register_lr_hook title-cases an all-lower-case policy ('step' -> 'Step') before looking it up.
    policy = lr_policy.title() if lr_policy == lr_policy.lower() else lr_policy
    base = HOOKS.get(f"{policy}LrUpdaterHook")
    if base is None:
        raise UsageError(f"lr_config.policy={lr_policy!r} names no mmcv lr hook; fix the config's lr_config")
    counted = f"StepCounted{policy}"
    if HOOKS.get(f"{counted}LrUpdaterHook") is None:
        HOOKS.register_module(name=f"{counted}LrUpdaterHook", module=lr_hook_class(base))
    return OPTIMIZER_HOOK, counted
