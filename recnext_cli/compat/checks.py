"""How `recnext doctor` proves each in-process fix works: it makes the call that fails on unpatched mmcv/mmdet.

Each check returns None when the call succeeds against the patched objects, the first line of what went wrong, or
`NotHere` when this machine cannot make the call at all, so a "fixed in-process" row in `recnext doctor` is a
measurement, not a flag.
"""

from __future__ import annotations

import os
import tempfile


class NotHere(str):
    """Why the failing call cannot be made on this machine (e.g. it needs a GPU)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def ddp_forward() -> str | None:
    """mmcv's `_run_ddp_forward` reads `_use_replicated_tensor_module`, which torch >= 2.0 never sets."""
    import torch
    from mmcv.parallel import MMDistributedDataParallel

    # The forward path only: a wrapper object without a process group, as DDP's own __init__ would need one.
    wrapper = MMDistributedDataParallel.__new__(MMDistributedDataParallel)
    torch.nn.Module.__init__(wrapper)
    wrapper.module = torch.nn.Identity()
    wrapper.device_ids = None
    probe = torch.ones(2)
    try:
        out = wrapper._run_ddp_forward(probe)
    except Exception as exc:
        return _first_line(exc)
    return None if out is probe else "the wrapped module's output was not returned"


def scatter_streams() -> str | None:
    """mmcv's Scatter.forward hands an int to torch's `_get_stream` when copying CPU inputs to GPUs."""
    import torch
    from mmcv.parallel._functions import Scatter

    if not torch.cuda.is_available():
        return NotHere("not exercised: no GPU visible (Scatter copies inputs to GPUs only)")
    try:
        (out,) = Scatter.forward([0], torch.ones(2))
    except Exception as exc:
        return _first_line(exc)
    return None if out.device == torch.device("cuda", 0) else f"scattered to {out.device}, not cuda:0"


def checkpoint_loading() -> str | None:
    """torch >= 2.6 refuses mmdet checkpoints whose meta holds numpy values; a pickled callable must stay refused."""
    import numpy
    import torch
    from mmcv.runner import CheckpointLoader

    with tempfile.TemporaryDirectory(prefix="recnext-doctor-") as tmp:
        good, evil = os.path.join(tmp, "good.pth"), os.path.join(tmp, "evil.pth")
        torch.save({"meta": {"best": numpy.float64(0.5), "seeds": numpy.arange(3)}, "state_dict": {}}, good)
        torch.save({"meta": {"hook": os.getcwd}, "state_dict": {}}, evil)
        try:
            loaded = CheckpointLoader.load_checkpoint(good, map_location="cpu", logger="silent")
        except Exception as exc:
            return _first_line(exc)
        if float(loaded["meta"]["best"]) != 0.5:
            return "the numpy metadata did not survive loading"
        try:
            CheckpointLoader.load_checkpoint(evil, map_location="cpu", logger="silent")
        except Exception:
            return None
        return "a checkpoint holding a Python callable was loaded: the weights-only guard is off"


def cpu_distributed() -> str | None:
    """mmdet's build_ddp asserts a CUDA/MLU/NPU device; CPU workers need it to wrap the model for gloo."""
    import torch
    import torch.distributed as dist
    from mmdet.utils import build_ddp

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build_ddp(torch.nn.Linear(2, 1), "cpu")
        out = model._run_ddp_forward(torch.ones(1, 2))
    except Exception as exc:
        return _first_line(exc)
    finally:
        if own_group:
            dist.destroy_process_group()
    return None if tuple(out.shape) == (1, 1) else f"unexpected output shape {tuple(out.shape)}"
