"""When detection training turns BatchNorm into SyncBatchNorm, and the conversion itself."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

# The device of the run building models in this context (its config's `device`), set by recnext's workers.
_RUN_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("recnext_run_device", default=None)


@contextlib.contextmanager
def run_device(device: str) -> Iterator[None]:
    """Models built inside this block belong to a run on `device` ('cuda' or 'cpu'), whatever GPUs are visible."""
    token = _RUN_DEVICE.set(device)
    try:
        yield
    finally:
        _RUN_DEVICE.reset(token)


def distributed_world_size() -> int:
    """The process-group size when torch.distributed is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def should_sync_bn(world_size: int, device: torch.device | str | None) -> bool:
    """SyncBatchNorm only pays off with several processes, and its training forward has no CPU kernel."""
    return world_size > 1 and device is not None and torch.device(device).type == "cuda"


def maybe_sync_bn(
    module: nn.Module, *, world_size: int | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Convert every BatchNorm of `module` to SyncBatchNorm when training runs on several CUDA processes.

    The published detection backbone converts unconditionally, which breaks single-process and CPU runs;
    here a run keeps plain BatchNorm unless `should_sync_bn` holds. `world_size` defaults to the initialised
    process group's size and `device` to the one the enclosing `run_device` block names: a worker started with
    `--device cpu` keeps BatchNorm on a machine with GPUs, and a model built outside any run keeps it too.
    Children are replaced in place; the returned module is `module` unless `module` is itself a BatchNorm.
    """
    if world_size is None:
        world_size = distributed_world_size()
    if device is None:
        device = _RUN_DEVICE.get()
    if not should_sync_bn(world_size, device):
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
