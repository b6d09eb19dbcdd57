"""Distributed data parallel on torch >= 2.0 and on machines without GPUs."""

from __future__ import annotations

import functools
import os
import tempfile

from recnext_cli.compat._util import is_marked, mark, torch_at_least


def replicated_tensor_fix_needed() -> bool:
    from mmcv.parallel import MMDistributedDataParallel

    # mmcv 1.7 reads DDP attributes that torch 2.0 removed together with the replicated-tensor experiment.
    return "_run_ddp_forward" in vars(MMDistributedDataParallel) and torch_at_least("2.0")


def run_ddp_forward_patched() -> bool:
    from mmcv.parallel import MMDistributedDataParallel

    return is_marked(MMDistributedDataParallel._run_ddp_forward)


def _run_ddp_forward(self, *inputs, **kwargs):
    # As mmcv's own version, minus `_use_replicated_tensor_module`, which torch >= 2.0 no longer defines.
    if self.device_ids:
        inputs, kwargs = self.to_kwargs(inputs, kwargs, self.device_ids[0])
        return self.module(*inputs[0], **kwargs[0])
    return self.module(*inputs, **kwargs)


def patch_run_ddp_forward() -> None:
    from mmcv.parallel import MMDistributedDataParallel

    MMDistributedDataParallel._run_ddp_forward = mark(_run_ddp_forward, MMDistributedDataParallel._run_ddp_forward)


def cpu_distributed_fix_needed() -> bool:
    # mmdet 2.28's build_ddp refuses 'cpu' and its result collection allocates CUDA tensors, on every torch.
    return True


def cpu_distributed_patched() -> bool:
    import mmdet.apis.test
    import mmdet.utils.util_distribution as dist_util

    return is_marked(dist_util.build_ddp) and is_marked(mmdet.apis.test.collect_results_cpu)


@functools.cache
def cpu_ddp_class():
    """MMDistributedDataParallel for CPU workers: unwraps DataContainers onto the CPU as MMDataParallel does."""
    from mmcv.parallel import MMDistributedDataParallel

    class CPUDistributedDataParallel(MMDistributedDataParallel):
        # Without device_ids mmcv hands DataContainers to the model unscattered; [-1] scatters to the CPU.
        def train_step(self, *inputs, **kwargs):
            inputs, kwargs = self.scatter(inputs, kwargs, [-1])
            return super().train_step(*inputs[0], **kwargs[0])

        def val_step(self, *inputs, **kwargs):
            inputs, kwargs = self.scatter(inputs, kwargs, [-1])
            return super().val_step(*inputs[0], **kwargs[0])

        def _run_ddp_forward(self, *inputs, **kwargs):
            inputs, kwargs = self.to_kwargs(inputs, kwargs, -1)
            return self.module(*inputs[0], **kwargs[0])

    return CPUDistributedDataParallel


def patch_cpu_distributed() -> None:
    import mmdet.apis.test
    import mmdet.apis.train
    import mmdet.utils
    import mmdet.utils.util_distribution as dist_util

    original_build_ddp = dist_util.build_ddp

    def build_ddp(model, device="cuda", *args, **kwargs):
        if device != "cpu":
            return original_build_ddp(model, device, *args, **kwargs)
        kwargs.pop("device_ids", None)
        return cpu_ddp_class()(model, *args, **kwargs)

    original_collect = mmdet.apis.test.collect_results_cpu

    def collect_results_cpu(result_part, size, tmpdir=None):
        import torch.distributed as dist

        if tmpdir is None and dist.is_initialized() and dist.get_backend() == "gloo":
            # mmdet broadcasts the temporary directory's name in a CUDA tensor; gloo workers share it as an object.
            shared = [None]
            if dist.get_rank() == 0:
                os.makedirs(".dist_test", exist_ok=True)
                shared[0] = tempfile.mkdtemp(dir=".dist_test")
            dist.broadcast_object_list(shared, src=0)
            tmpdir = shared[0]
        return original_collect(result_part, size, tmpdir)

    mark(build_ddp, original_build_ddp)
    for module in (dist_util, mmdet.utils, mmdet.apis.train):
        if getattr(module, "build_ddp", None) is original_build_ddp:
            module.build_ddp = build_ddp
    mmdet.apis.test.collect_results_cpu = mark(collect_results_cpu, original_collect)
