"""In-process fixes for mmcv-full 1.7 / mmdet 2.28 on current torch: monkeypatches applied at import, never file edits."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from recnext_cli.compat import checkpoint, checks, ddp, ext_hook, ops, scatter

# Processes that import recnext's fixes find RoIAlign/NMS even where setup's .pth hook is missing.
ext_hook.install()


@dataclasses.dataclass(frozen=True)
class Fix:
    """One known incompatibility: how to tell whether it bites here, and the patch that removes it."""

    key: str
    title: str
    symptom: str
    remedy: str
    needed: Callable[[], bool]
    apply: Callable[[], None]
    applied: Callable[[], bool]
    check: Callable[[], str | None]  # makes the originally failing call; None when it now works


FIXES: tuple[Fix, ...] = (
    Fix(
        key="ddp-replicated-tensor",
        title="MMDistributedDataParallel forward on torch >= 2.0",
        symptom="AttributeError: 'MMDistributedDataParallel' object has no attribute '_use_replicated_tensor_module'",
        remedy="run through recnext's runners (they patch _run_ddp_forward to use self.module)",
        needed=ddp.replicated_tensor_fix_needed,
        apply=ddp.patch_run_ddp_forward,
        applied=ddp.run_ddp_forward_patched,
        check=checks.ddp_forward,
    ),
    Fix(
        key="scatter-stream",
        title="Scatter.forward passes an int to torch's _get_stream (torch >= 2.0)",
        symptom="AttributeError: 'int' object has no attribute 'type'",
        remedy="run through recnext's runners (they pass torch.device('cuda', i))",
        needed=scatter.fix_needed,
        apply=scatter.patch,
        applied=scatter.patched,
        check=checks.scatter_streams,
    ),
    Fix(
        key="checkpoint-weights-only",
        title="torch.load defaults to weights_only=True (torch >= 2.6)",
        symptom="Weights only load failed ... Unsupported global: numpy ...",
        remedy="run through recnext's runners (they allow exactly the numpy globals mmdet meta uses)",
        needed=checkpoint.fix_needed,
        apply=checkpoint.patch,
        applied=checkpoint.patched,
        check=checks.checkpoint_loading,
    ),
    Fix(
        key="cpu-distributed",
        title="distributed runs without GPUs (gloo, no set_device, CPU result collection)",
        symptom="AssertionError: Only available for cuda or mlu or npu devices / Torch not compiled with CUDA",
        remedy="run through recnext's runners with --device cpu",
        needed=ddp.cpu_distributed_fix_needed,
        apply=ddp.patch_cpu_distributed,
        applied=ddp.cpu_distributed_patched,
        check=checks.cpu_distributed,
    ),
    Fix(
        key="ops-without-cuda",
        title="mmcv-full compiled without CUDA kernels, running on a GPU",
        symptom="RuntimeError: ... roi_align_forward_impl / nms_impl: implementation for device cuda:0 not found",
        remedy="run through recnext's runners (GPU RoIAlign/NMS calls go to torchvision's kernels), or "
        "`recnext setup --compile-ops` on a machine with nvcc",
        needed=ops.fallback_needed,
        apply=ops.patch,
        applied=ops.patched,
        check=ops.check,
    ),
)


def apply_all() -> list[str]:
    """Apply every fix this environment needs (idempotent); return the keys of the fixes in force."""
    in_force = []
    for fix in FIXES:
        if fix.needed():
            if not fix.applied():
                fix.apply()
            in_force.append(fix.key)
    return in_force


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group torchrun (or our Slurm runner) described in the environment; (rank, world_size).

    mmcv's init_dist('pytorch') always picks NCCL and calls torch.cuda.set_device, so it cannot start without GPUs:
    CPU workers use gloo and leave CUDA alone. A CUDA worker drives GPU LOCAL_RANK modulo the GPUs it sees, as
    mmcv's own Slurm start-up does: with one GPU bound per Slurm task every task sees only cuda:0. LOCAL_RANK is
    then rewritten to that index, as mmcv does too, because mmdet's train_detector reads it as the DDP device id.
    """
    import torch
    import torch.distributed as dist

    from recnext_cli.errors import EnvironmentProblem

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 1:
            raise EnvironmentProblem(
                "--device cuda, but this worker sees no CUDA GPU (check CUDA_VISIBLE_DEVICES and the job's GPU binding)"
            )
        index = int(os.environ.get("LOCAL_RANK", 0)) % gpus
        os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()
