"""CUDA-only worker paths proved on CPU: the GPU a Slurm task drives, and SyncBatchNorm following the run's device.

No GPU is needed: a seam makes torch see the GPUs a real job would (a device count, a visible GPU), and the code
under test runs unchanged.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from recnext_cli.nn import sync_bn
from recnext_cli.runners import TORCHRUN_VARIABLES, join_job
from recnext_cli.zoo import CONFIG_ROOT

TINY = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(child, kind) for child in module.modules())


@pytest.fixture
def slurm_task(monkeypatch):
    """Puts this process in the environment srun gives task `local_id` of a 4-task step on one node."""
    for name in TORCHRUN_VARIABLES:
        # setenv first, so that monkeypatch records the value before the test (or its absence) and puts it back:
        # a bare delenv of an unset variable records nothing, and what join_job wrote would outlive the test.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def enter(local_id: int) -> None:
        for name, value in {"SLURM_PROCID": local_id, "SLURM_NTASKS": 4, "SLURM_LOCALID": local_id,
                            "SLURM_JOB_NODELIST": "gpu01", "SLURM_JOB_ID": 4242}.items():
            monkeypatch.setenv(name, str(value))
        join_job("slurm")  # writes os.environ directly: the monkeypatch entries above undo it after the test

    return enter


@pytest.mark.parametrize(
    ("local_id", "gpus_per_task", "device"),
    [(0, 1, 0), (3, 1, 0), (3, 2, 1), (2, 4, 2)],  # --gpus-per-task=1 / --gpu-bind: every task sees only cuda:0
)
def test_a_slurm_task_drives_its_local_rank_modulo_the_gpus_it_sees(
    monkeypatch, slurm_task, local_id, gpus_per_task, device
):
    from recnext_cli import compat

    slurm_task(local_id)
    chosen = []
    # Seams for what only a GPU node has: the GPUs Slurm bound to this task, selecting one, and NCCL (a gloo group
    # of one process stands in, so the rest of init_distributed runs for real).
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_per_task)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    init_process_group = dist.init_process_group

    def gloo_of_one(backend):
        chosen.append(backend)
        init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)

    monkeypatch.setattr(dist, "init_process_group", gloo_of_one)
    try:
        compat.init_distributed("cuda")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert chosen == [device, "nccl"]
    # mmdet's train_detector and our test runner take LOCAL_RANK as the DDP device id.
    assert os.environ["LOCAL_RANK"] == str(device)


def test_a_cuda_worker_that_sees_no_gpu_says_so(monkeypatch, slurm_task):
    from recnext_cli import compat
    from recnext_cli.errors import EnvironmentProblem

    slurm_task(1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(EnvironmentProblem, match="sees no CUDA GPU"):
        compat.init_distributed("cuda")


def _norm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))


def test_sync_bn_follows_the_run_device_not_the_gpus_in_sight(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setattr(sync_bn, "distributed_world_size", lambda: 2)  # a job of two workers
    # No run has said it uses CUDA: a visible GPU alone is no reason to convert.
    no_run = sync_bn.maybe_sync_bn(_norm_net())
    assert _count(no_run, nn.SyncBatchNorm) == 0
    cpu_run = _norm_net()
    with sync_bn.run_device("cpu"):
        sync_bn.maybe_sync_bn(cpu_run)
    assert _count(cpu_run, nn.SyncBatchNorm) == 0 and _count(cpu_run, nn.BatchNorm2d) == 2
    with sync_bn.run_device("cuda"):
        cuda_run = sync_bn.maybe_sync_bn(_norm_net())
    assert _count(cuda_run, nn.SyncBatchNorm) == 2


def test_a_cpu_worker_on_a_gpu_machine_builds_its_detector_with_plain_batchnorm(monkeypatch):
    pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")
    import mmcv

    from recnext_cli import compat, runners

    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones, as every worker does)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sync_bn, "distributed_world_size", lambda: 2)
    cfg = mmcv.Config.fromfile(str(TINY))
    cpu_detector = runners.build_detector(cfg, "cpu")
    assert _count(cpu_detector.backbone, nn.SyncBatchNorm) == 0 and _count(cpu_detector.backbone, nn.BatchNorm2d) > 0
    # A training forward through it works on the CPU (SyncBatchNorm's would not).
    cpu_detector.backbone.train()
    cpu_detector.backbone(torch.randn(2, 3, 64, 64))
    cuda_detector = runners.build_detector(cfg, "cuda")
    assert _count(cuda_detector.backbone, nn.SyncBatchNorm) > 0
