"""recnext's torchvision-backed mmcv ops: equal to mmcv's compiled kernels, found by plain mmdet code, routed right.

The reference answers in tests/data/mmcv_ops_reference.npz were recorded from mmcv-full 1.7.2's compiled CPU kernels
by tests/mmcv_ops_reference.py; here the same cases run in a fresh process with the provider forced.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mmcv_ops_reference as reference

torch = pytest.importorskip("torch")
pytest.importorskip("mmcv")

TOLERANCE = 1e-5


def python(code: str, *, ops: str | None = None, hook: bool = True, timeout: float = 300):
    """Run `code` in a fresh interpreter of this environment; `hook` registers the provider first, as recnext's own
    processes do (without it, only setup's .pth file can)."""
    env = dict(os.environ)
    env.pop("RECNEXT_MMCV_OPS", None)
    if ops:
        env["RECNEXT_MMCV_OPS"] = ops
    code = textwrap.dedent(code)
    if hook:
        code = "from recnext_cli.compat import ext_hook; ext_hook.install()\n" + code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def recorded():
    with np.load(reference.REFERENCE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def provided(tmp_path_factory):
    """Every reference case computed by the provider, in a fresh process (RECNEXT_MMCV_OPS=torchvision)."""
    out = tmp_path_factory.mktemp("provider") / "answers.npz"
    script = Path(reference.__file__)
    env = dict(os.environ, RECNEXT_MMCV_OPS="torchvision")
    run = subprocess.run([sys.executable, str(script), "compute", str(out)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(out) as data:
        answers = {key: data[key] for key in data.files}
    assert str(answers["provider"]) == "torchvision"
    return answers


def test_reference_was_recorded_from_compiled_kernels_and_covers_every_case(recorded):
    assert str(recorded["provider"]) == "compiled"
    for key, *_ in reference.roi_cases():
        assert recorded[f"roi_out__{key}"].size and recorded[f"roi_grad__{key}"].any()
    for key, count, *_ in reference.nms_cases():
        assert len(recorded[f"nms_keep__{key}"]) <= count
    # NMS had work to do: the large cases drop boxes, and class-aware NMS keeps more than class-agnostic NMS.
    assert 0 < len(recorded["nms_keep__n12000_t0.5_o0_scores"]) < 12000
    assert len(recorded["bnms_keep__n2000_agn0_scores"]) > len(recorded["bnms_keep__n2000_agn1_scores"])
    # Past split_thr mmcv loops over the classes whatever `class_agnostic` says: the two agree there.
    np.testing.assert_array_equal(recorded["bnms_keep__n12000_agn0_scores"],
                                  recorded["bnms_keep__n12000_agn1_scores"])
    # Tied scores change which boxes survive: the cases with ties test the order boxes are visited in.
    assert not np.array_equal(recorded["nms_keep__n2000_t0.5_o0_scores"], recorded["nms_keep__n2000_t0.5_o0_tied_scores"])
    assert len(recorded["det_out__labels"]) > 10


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["", "class"])
def test_roi_align_matches_mmcv_forward_and_backward(recorded, provided, entry):
    worst_out = worst_grad = 0.0
    for key, *_ in reference.roi_cases():
        # The RoIAlign class and the roi_align function reach the same kernel: both are held to its recorded answers.
        expected_out, expected_grad = recorded[f"roi_out__{key}"], recorded[f"roi_grad__{key}"]
        got_out, got_grad = provided[f"roi_{entry}out__{key}"], provided[f"roi_{entry}grad__{key}"]
        assert got_out.shape == expected_out.shape and got_grad.shape == expected_grad.shape, key
        worst_out = max(worst_out, float(np.abs(got_out - expected_out).max()))
        worst_grad = max(worst_grad, float(np.abs(got_grad - expected_grad).max()))
        assert np.abs(got_out - expected_out).max() <= TOLERANCE, key
        assert np.abs(got_grad - expected_grad).max() <= TOLERANCE, key
    print(f"RoIAlign max abs difference: forward {worst_out:.2e}, backward {worst_grad:.2e}")


@pytest.mark.slow
def test_nms_keeps_exactly_mmcvs_boxes_for_both_offsets(recorded, provided):
    for key, *_ in reference.nms_cases():
        np.testing.assert_array_equal(provided[f"nms_keep__{key}"], recorded[f"nms_keep__{key}"], err_msg=key)


@pytest.mark.slow
def test_batched_nms_keeps_exactly_mmcvs_boxes_class_aware_agnostic_and_split(recorded, provided):
    for key, *_ in reference.batched_cases():
        np.testing.assert_array_equal(provided[f"bnms_keep__{key}"], recorded[f"bnms_keep__{key}"], err_msg=key)


@pytest.mark.slow
def test_the_published_m3_detector_detects_the_same_under_both_providers(recorded, provided):
    np.testing.assert_array_equal(provided["det_out__labels"], recorded["det_out__labels"])
    assert np.abs(provided["det_out__boxes"] - recorded["det_out__boxes"]).max() <= 1e-3
    shape = tuple(recorded["det_out__mask_shape"])
    assert tuple(provided["det_out__mask_shape"]) == shape
    ours, theirs = (np.unpackbits(m["det_out__masks"], axis=-1, count=shape[-1]).astype(bool)
                    for m in (provided, recorded))
    differing = (ours != theirs).sum(axis=(1, 2))
    print(f"{shape[0]} masks, {int(differing.sum())} pixels differ in all")
    # Identical where the convolutions round as they did when recording; a CPU with other vector units may flip the
    # odd pixel whose mask logit sits on the 0.5 threshold, never more than a sliver of a mask.
    assert (differing <= np.maximum(2, theirs.sum(axis=(1, 2)) // 200)).all(), differing


def test_provider_gives_the_answers_published_in_mmcvs_own_tests():
    run = python("""
        import json
        from recnext_cli.compat import ext_hook, ops_check
        import mmcv.ops
        print(ext_hook.active_provider(), json.dumps(ops_check.published_answers()))
    """, ops="torchvision")
    assert run.returncode == 0, run.stderr[-3000:]
    provider, answers = run.stdout.strip().split(" ", 1)
    assert provider == "torchvision"
    assert answers == '{"RoIAlign forward": null, "RoIAlign backward": null, "nms": null, "batched_nms": null}'


def test_published_answers_catch_a_kernel_that_is_slightly_off():
    # The doctor's ops rows must be able to fail: skew the provider's RoIAlign by 1% and its NMS order.
    run = python("""
        import json
        from recnext_cli.compat import mmcv_ext, ops_check
        import mmcv.ops, mmcv._ext as ext
        forward = ext.roi_align_forward
        def skewed(input, rois, output, *args, **kwargs):
            forward(input, rois, output, *args, **kwargs)
            output.mul_(1.01)
        ext.roi_align_forward = skewed
        ext.nms = lambda boxes, scores, iou_threshold, offset=0: mmcv_ext.nms(boxes, scores, iou_threshold).flip(0)
        print(json.dumps(ops_check.published_answers()))
    """, ops="torchvision")
    assert run.returncode == 0, run.stderr[-3000:]
    answers = __import__("json").loads(run.stdout)
    assert answers["RoIAlign forward"].startswith("cpu: case 1 pooled")
    assert answers["RoIAlign backward"] is None  # the backward kernel was left alone
    assert answers["nms"].startswith("cpu: kept [3, 0, 1]")


def test_plain_mmdet_code_finds_roi_align_and_nms_without_importing_recnext():
    # Nothing registers the provider here but the .pth file `recnext setup` wrote into site-packages.
    run = python(hook=False, code="""
        import sys
        from mmcv.ops import RoIAlign, batched_nms, nms
        from mmcv import Config
        from mmdet.models import build_detector
        import torch
        boxes = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
        print(sys.modules['mmcv._ext'].__spec__.origin, nms(boxes, torch.tensor([.9, .8, .7]), 0.5)[1].tolist())
    """)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("[0, 2]")


def test_a_compiled_extension_wins_over_the_provider_unless_the_provider_is_forced(tmp_path):
    # Stand in for mmcv-full's compiled module with a module of the same name found on mmcv's own package path.
    (tmp_path / "_ext.py").write_text("def get_compiling_cuda_version():\n    return 'not available'\n")
    code = f"""
        import mmcv
        mmcv.__path__.append({str(tmp_path)!r})
        import mmcv._ext
        print(ext_hook.active_provider())
    """
    assert python(code).stdout.strip() == "compiled"
    assert python(code, ops="torchvision").stdout.strip() == "torchvision"
    registered = "import sys; from recnext_cli.compat import ext_hook; print(ext_hook._installed() is not None)"
    assert python(registered).stdout.strip() == "True"
    assert python(registered, ops="compiled").stdout.strip() == "False"


def test_other_compiled_ops_import_and_fail_at_the_call_with_one_line_naming_the_op():
    run = python("""
        import torch
        from mmcv.ops import DeformConv2d, sigmoid_focal_loss, CARAFEPack
        from recnext_cli.errors import RecnextError
        layer = DeformConv2d(2, 2, 3, padding=1)
        try:
            layer(torch.rand(1, 2, 5, 5), torch.zeros(1, 18, 5, 5))
        except RecnextError as exc:
            print(str(exc))
    """, ops="torchvision")
    assert run.returncode == 0, run.stderr[-3000:]
    message = run.stdout.strip()
    assert "\\n" not in message and "`deform_conv_forward`" in message and "recnext setup --compile-ops" in message


def test_max_pooling_roi_align_is_refused_by_name(tmp_path):
    run = python("""
        import torch
        from mmcv.ops import roi_align
        try:
            roi_align(torch.rand(1, 1, 4, 4), torch.tensor([[0., 0, 0, 3, 3]]), 2, 1.0, 2, 'max', True)
        except NotImplementedError as exc:
            print(exc)
    """, ops="torchvision")
    assert "pool_mode='max'" in run.stdout and "--compile-ops" in run.stdout, run.stderr[-2000:]


class CpuOnlyKernels:
    """What a compiled CPU-only mmcv extension does with a tensor on another device, recording the calls it gets."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def kernel(first, *args, **kwargs):
            self.calls.append((name, first.device.type))
            if first.device.type != "cpu":
                raise RuntimeError(f"{name}_impl: implementation for device {first.device} not found.")
            from recnext_cli.compat import mmcv_ext

            return getattr(mmcv_ext, name)(first, *args, **kwargs)

        return kernel


def test_every_mask_rcnn_entry_point_sends_other_devices_to_the_provider(monkeypatch):
    """Issue 17.1: a CPU-only compiled build on a GPU; meta tensors stand in for CUDA ones."""
    from mmcv.ops import RoIAlign, batched_nms, nms, roi_align

    from recnext_cli.compat import ops
    from recnext_cli.compat._util import is_marked

    kernels = CpuOnlyKernels()
    for name in ops.ROUTED:
        monkeypatch.setattr(importlib.import_module(name), "ext_module", kernels)
    features = torch.empty((1, 2, 8, 8), device="meta", requires_grad=True)
    rois = torch.empty((3, 5), device="meta")
    # Unpatched, the compiled kernels refuse the device: the crash mmdet's mask targets hit on every training step.
    with pytest.raises(RuntimeError, match="roi_align_forward_impl: implementation for device meta"):
        roi_align(features, rois, 7, 1.0, 0, "avg", True)

    ops.patch()
    assert all(is_marked(importlib.import_module(name).ext_module) for name in ops.ROUTED)
    kernels.calls.clear()
    roi_align(features, rois, 7, 1.0, 0, "avg", True).sum().backward()
    assert features.grad.shape == features.shape and features.grad.device.type == "meta"
    assert RoIAlign(7, 0.25, 2)(features, rois).shape == (3, 2, 7, 7)
    boxes, scores = torch.empty((4, 4), device="meta"), torch.empty(4, device="meta")
    for call in (lambda: nms(boxes, scores, 0.5), lambda: batched_nms(boxes, scores, scores, {"iou_threshold": 0.5})):
        with pytest.raises(RuntimeError, match="torchvision::nms"):  # torchvision's own meta check: it got there
            call()
    assert kernels.calls == []
    # CPU tensors still reach the compiled kernels.
    cpu_boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    assert nms(cpu_boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)[1].tolist() == [0, 2]
    roi_align(torch.rand(1, 1, 4, 4, requires_grad=True), torch.tensor([[0.0, 0, 0, 3, 3]]), 2).sum().backward()
    assert kernels.calls == [("nms", "cpu"), ("roi_align_forward", "cpu"), ("roi_align_backward", "cpu")]
