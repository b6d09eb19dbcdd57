"""Rank 0's progress events from inside mmcv: a training hook, and mmcv's ProgressBar turned into events."""

from __future__ import annotations

import math
import time

from recnext_cli.progress import ProgressWriter

# After mmdet's EvalHook (LOW, 70), which puts the epoch's metrics in the log buffer, and before the logger hooks
# (VERY_LOW, 90), which print and clear it.
HOOK_PRIORITY = 80
METRIC_SUFFIXES = ("_mAP", "_mAP_50", "_mAP_75", "_mAP_s", "_mAP_m", "_mAP_l")
HOOK_TYPE = "RecnextProgressHook"


def progress_hook_config(rank: int, images_per_iter: int, log_interval: int) -> dict:
    """A `custom_hooks` entry that reports each epoch's iterations (loss, lr, images/s) and its evaluation metrics.

    Registers the hook type with mmcv on first use; mmdet's train_detector builds it from this entry.
    """
    from mmcv.runner import HOOKS

    if HOOKS.get(HOOK_TYPE) is None:
        HOOKS.register_module(name=HOOK_TYPE, module=_hook_class())
    return dict(type=HOOK_TYPE, rank=rank, images_per_iter=images_per_iter, log_interval=log_interval,
                priority=HOOK_PRIORITY)


def _hook_class():
    from mmcv.runner import Hook

    class ProgressHook(Hook):
        def __init__(self, rank: int, images_per_iter: int, log_interval: int) -> None:
            self.writer = ProgressWriter(rank)
            self.images_per_iter, self.log_interval = images_per_iter, max(1, log_interval)
            self.window: tuple[float, int] | None = None
            self.images_s: float | None = None

        def before_train_epoch(self, runner) -> None:
            self.writer.emit("phase", phase="train", total=len(runner.data_loader), epoch=runner.epoch + 1,
                             epochs=runner.max_epochs)
            self.window = None

        def after_train_iter(self, runner) -> None:
            done, now = runner.inner_iter + 1, time.monotonic()
            if self.window is None:
                self.window = (now, done)
            elif done - self.window[1] >= self.log_interval:
                seconds = max(now - self.window[0], 1e-9)
                self.images_s = (done - self.window[1]) * self.images_per_iter / seconds
                self.window = (now, done)
            log_vars = (getattr(runner, "outputs", None) or {}).get("log_vars", {})
            lrs = runner.current_lr()
            lr = (next(iter(lrs.values())) if isinstance(lrs, dict) else lrs)[0]
            self.writer.emit("step", done=done, loss=_number(log_vars.get("loss")), lr=_number(lr),
                             images_s=self.images_s, log=done % self.log_interval == 0)

        def after_train_epoch(self, runner) -> None:
            metrics = {key: value for key, value in runner.log_buffer.output.items()
                       if key.endswith(METRIC_SUFFIXES) and isinstance(value, (int, float))}
            if metrics:
                self.writer.emit("metrics", epoch=runner.epoch + 1, metrics=metrics)

    ProgressHook.__name__ = ProgressHook.__qualname__ = HOOK_TYPE
    return ProgressHook


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def route_progress_bars(writer: ProgressWriter, phase: str) -> None:
    """Make mmcv.ProgressBar (mmdet's test loops use it) report to `writer` instead of drawing on stdout.

    mmdet's single_gpu_test and multi_gpu_test look the class up on the mmcv module at every call, so replacing the
    attribute reaches them; without a launcher to read the events, mmcv's own bar stays.
    """
    import mmcv

    if not writer.active:
        return

    class EventProgressBar:
        def __init__(self, task_num: int = 0, *args, **kwargs) -> None:
            self.task_num, self.completed, self.started = task_num, 0, time.monotonic()
            writer.emit("phase", phase=phase, total=task_num)

        def start(self) -> None:
            pass

        def update(self, num_tasks: int = 1) -> None:
            self.completed += num_tasks
            elapsed = max(time.monotonic() - self.started, 1e-9)
            writer.emit("step", done=self.completed, images_s=self.completed / elapsed,
                        log=self.completed == self.task_num or self.completed % 10 == 0)

    mmcv.ProgressBar = EventProgressBar
