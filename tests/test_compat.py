"""Each in-process fix: the original failure reproduced without it, and the same call passing with it."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mmcv = pytest.importorskip("mmcv")
pytest.importorskip("mmcv.ops")

from recnext_cli import compat  # noqa: E402
from recnext_cli.compat import checkpoint, ddp, ops, scatter  # noqa: E402
from recnext_cli.compat._util import original_of  # noqa: E402
from recnext_cli.errors import IntegrityError  # noqa: E402


@pytest.fixture
def gloo_world_of_one():
    import torch.distributed as dist

    # Port 0: the store binds a port of the kernel's choosing, so no probed port can be taken in between.
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_forward_needs_fix_and_works_with_it(monkeypatch, gloo_world_of_one):
    from mmcv.parallel import MMDistributedDataParallel

    monkeypatch.setattr(MMDistributedDataParallel, "_run_ddp_forward",
                        original_of(MMDistributedDataParallel._run_ddp_forward))
    model = torch.nn.Linear(3, 2)
    wrapped = MMDistributedDataParallel(model)
    x = torch.randn(4, 3)
    assert ddp.replicated_tensor_fix_needed()
    with pytest.raises(AttributeError, match="_use_replicated_tensor_module"):
        wrapped(x)
    ddp.patch_run_ddp_forward()
    assert ddp.run_ddp_forward_patched()
    torch.testing.assert_close(wrapped(x), model(x))


def test_scatter_stream_needs_fix_and_passes_devices_with_it(monkeypatch):
    from mmcv.parallel import _functions as f

    monkeypatch.setattr(f.Scatter, "forward", staticmethod(original_of(f.Scatter.forward)))
    data = torch.zeros(2, 3)
    with pytest.raises(AttributeError, match="'int' object has no attribute 'type'"):
        f.Scatter.forward([0], data)

    asked, copied = [], []
    monkeypatch.setattr(f, "_get_stream", lambda device: asked.append(device))
    monkeypatch.setattr(f, "scatter", lambda tensor, gpus, streams: copied.append((gpus, streams)) or [tensor])
    monkeypatch.setattr(f, "synchronize_stream", lambda *args: None)
    scatter.patch()
    assert scatter.patched()
    out = f.Scatter.forward([0, 1], data)
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert copied == [([0, 1], [None, None])]
    assert out == (data,)


@pytest.mark.parametrize("payload", ["tensor", "list"])
def test_patched_scatter_returns_what_mmcv_returns_on_cpu(monkeypatch, payload):
    from mmcv.parallel import _functions as f

    original = original_of(f.Scatter.forward)
    scatter.patch()
    data = torch.arange(6.0).reshape(2, 3)
    item = data if payload == "tensor" else [data, data + 1]
    expected, got = original([-1], item), f.Scatter.forward([-1], item)
    assert type(got) is type(expected) is tuple and len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


class Payload:
    """Stands for an arbitrary Python object in a pickle: the safe loader must keep refusing it."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_with_numpy_meta_needs_fix_and_loads_with_it(monkeypatch, tmp_path):
    from mmcv.runner import load_checkpoint
    from mmcv.runner.checkpoint import CheckpointLoader

    monkeypatch.setitem(CheckpointLoader._schemes, "", original_of(CheckpointLoader._schemes[""]))
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "epoch_1.pth"
    meta = {"epoch": 1, "hook_msgs": {"best_score": np.float64(0.42)}, "seed": np.int64(7), "ids": np.arange(3)}
    torch.save({"meta": meta, "state_dict": {k: v + 1 for k, v in model.state_dict().items()}}, path)
    assert checkpoint.fix_needed()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(model, str(path), map_location="cpu")

    checkpoint.patch()
    assert checkpoint.patched()
    loaded = load_checkpoint(torch.nn.Linear(3, 2), str(path), map_location="cpu")
    assert loaded["meta"]["hook_msgs"]["best_score"] == pytest.approx(0.42)
    np.testing.assert_array_equal(loaded["meta"]["ids"], np.arange(3))

    hostile = tmp_path / "hostile.pth"
    torch.save({"meta": {"x": Payload()}, "state_dict": model.state_dict()}, hostile)
    # Refused by the safe unpickler, and reported as one line for the user rather than torch's pages of advice.
    with pytest.raises(IntegrityError, match="Unsupported global: GLOBAL print") as refused:
        load_checkpoint(model, str(hostile), map_location="cpu")
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError) and "\n" not in str(refused.value)


def test_cpu_distributed_needs_fix(monkeypatch, gloo_world_of_one, tmp_path):
    monkeypatch.chdir(tmp_path)  # mmdet's result collection makes .dist_test/ in the working directory
    import mmdet.apis.test as mmdet_test
    import mmdet.utils.util_distribution as dist_util

    monkeypatch.setattr(dist_util, "build_ddp", original_of(dist_util.build_ddp))
    monkeypatch.setattr(mmdet_test, "collect_results_cpu", original_of(mmdet_test.collect_results_cpu))
    with pytest.raises(AssertionError, match="Only available for cuda"):
        dist_util.build_ddp(torch.nn.Linear(2, 2), "cpu")
    # a CPU-only torch says "not compiled with CUDA", a CUDA build on a machine without GPUs "no NVIDIA driver"
    with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda|nvidia"):
        mmdet_test.collect_results_cpu([1], 1)

    ddp.patch_cpu_distributed()
    assert ddp.cpu_distributed_patched()
    wrapped = dist_util.build_ddp(torch.nn.Linear(2, 2), "cpu", device_ids=[0])
    assert isinstance(wrapped, ddp.cpu_ddp_class()) and not wrapped.device_ids
    assert mmdet_test.collect_results_cpu(["a", "b"], 2) == ["a", "b"]


@pytest.mark.slow
def test_cpu_distributed_two_gloo_workers_train_and_collect(tmp_path):
    worker = Path(__file__).with_name("compat_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "rank0.ok").read_text() == "ok"
    assert (tmp_path / "rank1.ok").read_text() == "ok"


def test_apply_all_is_idempotent_and_reports_fixes():
    first = compat.apply_all()
    second = compat.apply_all()
    assert first == second
    assert {"ddp-replicated-tensor", "scatter-stream", "checkpoint-weights-only", "cpu-distributed"} <= set(first)
    compiled_cpu_only = ops.compiled_ext() is not None and not ops.mmcv_has_cuda_ops()
    assert ("ops-without-cuda" in first) == (torch.cuda.is_available() and compiled_cpu_only)


def test_patching_twice_with_the_same_function_keeps_the_true_original():
    from recnext_cli.compat._util import mark

    def original():
        pass

    def replacement():
        pass

    patched = mark(replacement, original)
    assert mark(replacement, patched) is replacement  # a second patch() call sees its own function installed
    assert original_of(replacement) is original
