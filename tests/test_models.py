"""RecNeXt backbones: layout and sizes against the spec, strict loading, fusion, attention forms, SyncBN policy, mmdet wrapper."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

from recnext_cli import nn as rnn
from recnext_cli import variants, zoo
from recnext_cli.errors import RecnextError, UnknownModelError
from recnext_cli.nn import recnext as recnext_module

# The spec's variant table, written out here so the tests do not read the implementation's own table.
SPEC = {
    "m0": ("M", (40, 80, 160, 320), (2, 2, 9, 1), 2),
    "m1": ("M", (48, 96, 192, 384), (3, 3, 15, 2), 2),
    "m2": ("M", (56, 112, 224, 448), (3, 3, 15, 2), 2),
    "m3": ("M", (64, 128, 256, 512), (3, 3, 13, 2), 2),
    "m4": ("M", (64, 128, 256, 512), (5, 5, 25, 4), 2),
    "m5": ("M", (80, 160, 320, 640), (7, 7, 35, 2), 2),
    "a0": ("A", (40, 80, 160, 320), (2, 2, 9, 1), 2),
    "a1": ("A", (48, 96, 192, 384), (3, 3, 15, 2), 2),
    "a2": ("A", (56, 112, 224, 448), (3, 3, 15, 2), 2),
    "a3": ("A", (64, 128, 256, 512), (3, 3, 13, 2), 1.875),
    "a4": ("A", (64, 128, 256, 512), (5, 5, 25, 4), 1.875),
    "a5": ("A", (80, 160, 320, 640), (7, 7, 35, 2), 1.875),
}
COCO = ("m3", "m4", "m5", "a3", "a4", "a5")
K = 5  # token-mixer kernel of RecConv and RecAttn


def _bn_shapes(prefix: str, c: int) -> dict:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def _convnorm_shapes(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> dict:
    return {f"{prefix}.conv.weight": (cout, cin // groups, k, k), **_bn_shapes(f"{prefix}.norm", cout)}


def _mlp_shapes(prefix: str, c: int, h: int) -> dict:
    return {**_convnorm_shapes(f"{prefix}.0", c, h, 1), **_convnorm_shapes(f"{prefix}.2", h, c, 1)}


def spec_state_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The key -> shape map the spec prescribes, derived from its text alone."""
    series, widths, depths, ratio = SPEC[name]
    c0 = widths[0]
    shapes = {**_convnorm_shapes("stem.stem.0", 3, c0 // 2, 3), **_convnorm_shapes("stem.stem.2", c0 // 2, c0, 3)}
    for i, (c, depth) in enumerate(zip(widths, depths)):
        hidden = int(c * ratio)
        if i > 0:
            p = f"stages.{i}.downsample"
            shapes[f"{p}.token_mixer.weight"] = (c, 1, 7, 7)
            shapes[f"{p}.token_mixer.bias"] = (c,)
            shapes.update(_bn_shapes(f"{p}.norm", c))
            shapes.update(_mlp_shapes(f"{p}.channel_mixer", c, hidden))
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            if series == "M":
                level = 4 - i
                shapes[f"{p}.token_mixer.down.weight"] = (c, 1, K, K)
                for t in range(level + 1):
                    shapes[f"{p}.token_mixer.convs.{t}.weight"] = (c, 1, K, K)
                shapes.update(_bn_shapes(f"{p}.norm", c))
            else:
                shapes.update(_convnorm_shapes(f"{p}.token_mixer.down.0", c, c, K, groups=c))
                shapes.update(_convnorm_shapes(f"{p}.token_mixer.down.1.qk", c, 2 * c, 1, groups=2))
                shapes.update(_convnorm_shapes(f"{p}.token_mixer.down.1.pe", c, c, 3, groups=c))
                shapes.update(_convnorm_shapes(f"{p}.token_mixer.conv", c, c, K, groups=c))
            shapes.update(_mlp_shapes(f"{p}.channel_mixer", c, hidden))
    return shapes


def spec_parameter_count(name: str) -> int:
    """Learnable parameters by closed-form per-module counts (BatchNorm: weight + bias)."""
    series, widths, depths, ratio = SPEC[name]

    def convnorm(cin, cout, k, groups=1):
        return cout * (cin // groups) * k * k + 2 * cout

    def mlp(c, h):
        return convnorm(c, h, 1) + convnorm(h, c, 1)

    c0 = widths[0]
    total = convnorm(3, c0 // 2, 3) + convnorm(c0 // 2, c0, 3)
    for i, (c, depth) in enumerate(zip(widths, depths)):
        hidden = int(c * ratio)
        if i > 0:
            total += c * 49 + c + 2 * c + mlp(c, hidden)
        if series == "M":
            block = (4 - i + 2) * c * K * K + 2 * c + mlp(c, hidden)
        else:
            block = 2 * convnorm(c, c, K, groups=c) + convnorm(c, 2 * c, 1, groups=2) + convnorm(c, c, 3, groups=c)
            block += mlp(c, hidden)
        total += depth * block
    return total


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so fusion mistakes change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _random_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


def test_variant_table_matches_spec():
    assert set(variants.VARIANTS) == set(SPEC)
    for name, (series, widths, depths, ratio) in SPEC.items():
        v = variants.VARIANTS[name]
        assert (v.series, v.widths, v.depths, v.mlp_ratio) == (series, widths, depths, ratio)
    assert set(zoo.DETECTION_MODELS) == set(COCO)


@pytest.mark.parametrize("name", list(SPEC))
def test_state_dict_layout_matches_spec(name):
    ours = rnn.backbone_state_shapes(name)
    expected = spec_state_shapes(name)
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


@pytest.mark.parametrize("name", list(SPEC))
def test_parameter_count_matches_spec_formula(name):
    with torch.device("meta"):
        model = rnn.RecNeXt(name)
    assert sum(p.numel() for p in model.parameters()) == spec_parameter_count(name)


def test_spec_formulas_agree_with_each_other():
    # The shape map and the closed-form count are two independent readings of the spec.
    for name in SPEC:
        shapes = spec_state_shapes(name)
        learnable = [s for k, s in shapes.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert sum(math.prod(s) for s in learnable) == spec_parameter_count(name)


def test_state_shapes_are_a_fresh_dict_each_call():
    first = rnn.backbone_state_shapes("m3")
    first["stem.stem.0.conv.weight"] = (0,)
    assert rnn.backbone_state_shapes("recnext_m3")["stem.stem.0.conv.weight"] == (32, 3, 3, 3)


def test_unknown_variant_suggests_close_names():
    with pytest.raises(UnknownModelError, match="m3"):
        rnn.build_recnext("m33")
    assert issubclass(UnknownModelError, RecnextError)


def test_m3_maps_image_to_four_strided_maps():
    _check_feature_maps("m3")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in COCO if n != "m3"])
def test_coco_variants_map_image_to_four_strided_maps(name):
    _check_feature_maps(name)


def _check_feature_maps(name: str) -> None:
    model = rnn.build_recnext(name).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 160, 224))
    widths = SPEC[name][1]
    assert [tuple(o.shape) for o in outs] == [(1, c, 160 // s, 224 // s) for c, s in zip(widths, (4, 8, 16, 32))]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", COCO)
def test_strict_load_of_spec_shaped_state_dict(name):
    state = _random_state_dict(spec_state_shapes(name))
    with torch.device("meta"):
        model = rnn.RecNeXt(name)
    model.load_state_dict(state, strict=True, assign=True)
    loaded = model.state_dict()
    for key in ("stem.stem.0.conv.weight", "stages.3.downsample.token_mixer.bias", "stages.2.blocks.0.channel_mixer.2.norm.running_var"):
        assert torch.equal(loaded[key], state[key])


def test_strict_load_rejects_a_wrong_shape():
    state = _random_state_dict(spec_state_shapes("a3"))
    state["stages.1.blocks.0.token_mixer.down.1.qk.conv.weight"] = torch.zeros(256, 128, 1, 1)
    with torch.device("meta"):
        model = rnn.RecNeXt("a3")
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(state, strict=True, assign=True)


@pytest.mark.parametrize("name", ["m3", "a3"])
def test_fused_matches_unfused(name):
    torch.manual_seed(0)
    model = rnn.build_recnext(name)
    _randomise_norms(model)
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference = model(x)
        fused = copy.deepcopy(model).fuse()
        out = fused(x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert not any(isinstance(m, rnn.ConvNorm) for m in fused.modules())
    for a, b in zip(reference, out):
        assert _max_relative_error(a, b) < 1e-4


def test_fuse_also_folds_sync_batchnorm():
    torch.manual_seed(0)
    model = rnn.build_recnext("m0")
    _randomise_norms(model)
    rnn.maybe_sync_bn(model, world_size=2, device="cuda")
    assert _count(model, nn.SyncBatchNorm) > 0
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference = model(x)
        out = model.fuse()(x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for a, b in zip(reference, out):
        assert _max_relative_error(a, b) < 1e-4


def test_randomised_norms_change_the_output():
    # Guards the fusion test: with default BN statistics a forgotten fold would go unnoticed.
    torch.manual_seed(0)
    model = rnn.build_recnext("m0").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[-1]
        _randomise_norms(model)
        after = model(x)[-1]
    assert _max_relative_error(after, before) > 1e-2


def test_fold_norm_before_refuses_padded_conv():
    with pytest.raises(ValueError):
        rnn.fold_norm_before(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))


def test_fold_helpers_are_exact_on_grouped_and_dense_convs():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8)
    _randomise_norms(norm)
    norm.eval()
    x = torch.randn(2, 8, 9, 9)
    depthwise = nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8)
    dense = nn.Conv2d(8, 6, 1)
    with torch.no_grad():
        assert _max_relative_error(norm(depthwise(x)), rnn.fold_norm_after(depthwise, norm)(x)) < 1e-5
        assert _max_relative_error(dense(norm(x)), rnn.fold_norm_before(norm, dense)(x)) < 1e-5


@pytest.mark.parametrize("n", [1, 7, 64])
def test_linear_and_quadratic_attention_agree(n):
    g = torch.Generator().manual_seed(n)
    q = torch.nn.functional.elu(torch.randn(2, 4, 16, n, generator=g)) + 1
    k = torch.nn.functional.elu(torch.randn(2, 4, 16, n, generator=g)) + 1
    v = torch.randn(2, 4, 16, n, generator=g)
    linear = rnn.linear_attention(q, k, v)
    assert linear.shape == v.shape
    assert _max_relative_error(rnn.quadratic_attention(q, k, v), linear) < 1e-5


def test_a_backbone_with_quadratic_attention_gives_same_features(monkeypatch):
    torch.manual_seed(0)
    model = rnn.build_recnext("a0")
    _randomise_norms(model)
    model.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        linear = model(x)
        monkeypatch.setattr(recnext_module, "linear_attention", rnn.quadratic_attention)
        quadratic = model(x)
    for a, b in zip(linear, quadratic):
        assert _max_relative_error(a, b) < 1e-4


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


def test_sync_bn_only_for_several_cuda_processes():
    assert rnn.should_sync_bn(2, "cuda")
    assert rnn.should_sync_bn(8, torch.device("cuda", 3))
    assert not rnn.should_sync_bn(1, "cuda")
    assert not rnn.should_sync_bn(2, "cpu")


def test_maybe_sync_bn_converts_every_norm_when_asked():
    model = rnn.build_recnext("m0")
    norms = _count(model, nn.BatchNorm2d)
    converted = rnn.maybe_sync_bn(model, world_size=2, device="cuda")
    assert converted is model
    assert _count(model, nn.BatchNorm2d) == 0
    assert _count(model, nn.SyncBatchNorm) == norms


@pytest.mark.parametrize("world_size, device", [(1, "cuda"), (4, "cpu"), (None, None)])
def test_maybe_sync_bn_keeps_plain_norms(world_size, device):
    # (None, None): no process group here, so the default world size is 1.
    model = rnn.build_recnext("m0")
    norms = _count(model, nn.BatchNorm2d)
    rnn.maybe_sync_bn(model, world_size=world_size, device=device)
    assert _count(model, nn.BatchNorm2d) == norms
    assert _count(model, nn.SyncBatchNorm) == 0


# mmdet 2.x wrapper. These need mmcv-full and mmdet (`recnext setup`).


@pytest.fixture(scope="module")
def mmdet_models():
    pytest.importorskip("mmcv.ops", reason="mmcv-full is not installed; run `recnext setup`")
    models = pytest.importorskip("mmdet.models", reason="mmdet is not installed; run `recnext setup`")
    import recnext_cli.models  # noqa: F401  (registers the backbones)

    return models


def _imagenet_checkpoint(path, name: str, extra: dict | None = None) -> dict[str, torch.Tensor]:
    state = _random_state_dict(spec_state_shapes(name))
    head = {"head.head.l.weight": torch.zeros(1000, SPEC[name][1][-1]), "head.head.l.bias": torch.zeros(1000)}
    torch.save({"model": {**state, **head}, **(extra or {})}, path)
    return state


def test_all_variants_registered(mmdet_models):
    from mmdet.models.builder import BACKBONES

    assert {f"recnext_{n}" for n in SPEC} <= set(BACKBONES.module_dict)


def test_build_backbone_random_init_with_resnet_style_keys(mmdet_models):
    from mmcv.runner import BaseModule

    backbone = mmdet_models.build_backbone(
        dict(
            type="recnext_m3",
            depth=50,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            frozen_stages=1,
            norm_cfg=dict(type="BN", requires_grad=True),
            norm_eval=True,
            style="pytorch",
            pretrained="torchvision://resnet50",
        )
    )
    assert isinstance(backbone, BaseModule) and isinstance(backbone, rnn.RecNeXt)
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == spec_state_shapes("m3")
    backbone.init_weights()
    backbone.train()
    # frozen_stages / norm_eval are ignored as in the published code: every BatchNorm trains.
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.training and m.weight.requires_grad for m in norms)
    assert all(p.requires_grad for p in backbone.parameters())


def test_build_backbone_rejects_unknown_keys(mmdet_models):
    with pytest.raises(TypeError, match="drop_path"):
        mmdet_models.build_backbone(dict(type="recnext_a3", drop_path=0.1))


def test_imagenet_checkpoint_loads_and_logs_head_keys(mmdet_models, tmp_path, caplog):
    path = tmp_path / "recnext_m3_distill_300e.pth"
    state = _imagenet_checkpoint(path, "m3")
    backbone = mmdet_models.build_backbone(dict(type="recnext_m3", init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    with caplog.at_level(logging.INFO, logger="mmdet"):
        backbone.init_weights()
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert "head.head.l.weight" in caplog.text and "unexpected" in caplog.text
    assert "missing" not in caplog.text


def test_mmdet_checkpoint_and_plain_state_dict_load(mmdet_models, tmp_path):
    state = _random_state_dict(spec_state_shapes("a3"), seed=1)
    mmdet_file = tmp_path / "coco.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": {**{f"backbone.{k}": v for k, v in state.items()}, "neck.w": torch.ones(1)}}, mmdet_file)
    plain_file = tmp_path / "plain.pth"
    torch.save(state, plain_file)
    for path in (mmdet_file, plain_file):
        backbone = mmdet_models.build_backbone(dict(type="recnext_a3", init_cfg=dict(type="Pretrained", checkpoint=str(path))))
        backbone.init_weights()
        loaded = backbone.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_missing_keys_are_logged_as_warning(mmdet_models, tmp_path, caplog):
    state = _random_state_dict(spec_state_shapes("m0"))
    del state["stages.3.blocks.0.norm.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    backbone = mmdet_models.build_backbone(dict(type="recnext_m0", init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    with caplog.at_level(logging.INFO, logger="mmdet"):
        backbone.init_weights()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stages.3.blocks.0.norm.weight" in warnings[0].getMessage()


def test_unset_or_unsafe_checkpoints_are_refused(mmdet_models, tmp_path):
    import argparse

    from recnext_cli.errors import IntegrityError, UsageError

    placeholder = mmdet_models.build_backbone(dict(type="recnext_m0", init_cfg=dict(type="Pretrained", checkpoint=None)))
    with pytest.raises(UsageError, match="model.backbone.init_cfg.checkpoint"):
        placeholder.init_weights()
    absent = mmdet_models.build_backbone(dict(type="recnext_m0", init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "no.pth"))))
    with pytest.raises(UsageError, match="does not exist"):
        absent.init_weights()
    pickled = tmp_path / "pickled.pth"
    _imagenet_checkpoint(pickled, "m0", extra={"args": argparse.Namespace(lr=1e-3)})
    unsafe = mmdet_models.build_backbone(dict(type="recnext_m0", init_cfg=dict(type="Pretrained", checkpoint=str(pickled))))
    with pytest.raises(IntegrityError, match="does not unpickle"):
        unsafe.init_weights()
    other_variant = tmp_path / "recnext_m1_distill_300e.pth"
    _imagenet_checkpoint(other_variant, "m1")
    mismatched = mmdet_models.build_backbone(dict(type="recnext_m0", init_cfg=dict(type="Pretrained", checkpoint=str(other_variant))))
    with pytest.raises(IntegrityError, match="does not fit recnext_m0"):
        mismatched.init_weights()


def _tiny_detector(mmdet_models, variant: str):
    import mmcv

    from recnext_cli.models import config_file, set_pretrain_checkpoint

    cfg = mmcv.Config.fromfile(str(config_file(variant)))
    set_pretrain_checkpoint(cfg, None)
    cfg.model.roi_head.bbox_head.num_classes = 3
    cfg.model.roi_head.mask_head.num_classes = 3
    # Fewer proposals and RoIs than the recipe: the same code path at a fraction of the CPU time.
    cfg.model.train_cfg.rpn_proposal.max_per_img = 64
    cfg.model.train_cfg.rcnn.sampler.num = 32
    cfg.model.test_cfg.rpn.max_per_img = 64
    return mmdet_models.build_detector(cfg.model, train_cfg=None, test_cfg=None)


def _tiny_batch(size: int = 128):
    import numpy as np
    from mmdet.core import BitmapMasks

    torch.manual_seed(0)
    img = torch.randn(1, 3, size, size)
    meta = dict(
        img_shape=(size, size, 3),
        ori_shape=(size, size, 3),
        pad_shape=(size, size, 3),
        scale_factor=np.ones(4, dtype=np.float32),
        flip=False,
        flip_direction=None,
    )
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 40.0, 120.0, 110.0]])
    masks = np.zeros((2, size, size), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    return img, [meta], [boxes], [torch.tensor([0, 2])], [BitmapMasks(masks, size, size)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", COCO)
def test_mask_rcnn_trains_and_tests_on_cpu(mmdet_models, variant):
    detector = _tiny_detector(mmdet_models, variant)
    backbone_keys = {k.removeprefix("backbone."): tuple(v.shape) for k, v in detector.state_dict().items() if k.startswith("backbone.")}
    assert backbone_keys == spec_state_shapes(variant)
    img, metas, boxes, labels, masks = _tiny_batch()

    detector.train()
    losses = detector.forward_train(img, metas, boxes, labels, gt_masks=masks)
    loss, log_vars = detector._parse_losses(losses)
    loss.backward()
    assert {"loss_rpn_cls", "loss_cls", "loss_bbox", "loss_mask"} <= set(log_vars)
    assert torch.isfinite(loss)
    first = detector.backbone.stem.stem[0].conv.weight.grad
    assert first is not None and first.abs().sum() > 0

    detector.eval()
    with torch.no_grad():
        (bbox_result, segm_result), = detector.simple_test(img, metas, rescale=True)
        features = detector.extract_feat(img)
        detector.backbone.fuse()
        fused = detector.extract_feat(img)
    assert len(bbox_result) == 3 and len(segm_result) == 3
    assert all(r.shape[1] == 5 for r in bbox_result)
    for a, b in zip(features, fused):
        assert _max_relative_error(a, b) < 1e-4


@pytest.mark.slow
def test_detector_init_weights_loads_pretrained_backbone(mmdet_models, tmp_path):
    import mmcv

    from recnext_cli.errors import UsageError
    from recnext_cli.models import config_file, set_pretrain_checkpoint

    cfg = mmcv.Config.fromfile(str(config_file("m3")))
    with pytest.raises(UsageError):
        mmdet_models.build_detector(cfg.model).init_weights()
    path = tmp_path / "recnext_m3_distill_300e.pth"
    state = _imagenet_checkpoint(path, "m3")
    set_pretrain_checkpoint(cfg, path)
    detector = mmdet_models.build_detector(cfg.model)
    detector.init_weights()
    loaded = detector.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.slow
def test_multi_gpu_build_uses_sync_bn_and_still_initialises(mmdet_models, tmp_path, monkeypatch):
    import mmcv

    from recnext_cli.models import config_file, set_pretrain_checkpoint
    from recnext_cli.nn import sync_bn

    # What a torchrun worker of a CUDA run sees; conversion itself needs neither GPUs nor a process group.
    monkeypatch.setattr(sync_bn, "distributed_world_size", lambda: 8)
    path = tmp_path / "recnext_a3_distill_300e.pth"
    state = _imagenet_checkpoint(path, "a3")
    cfg = mmcv.Config.fromfile(str(config_file("a3")))
    set_pretrain_checkpoint(cfg, path)
    with sync_bn.run_device("cuda"):
        detector = mmdet_models.build_detector(cfg.model)
    assert _count(detector.backbone, nn.BatchNorm2d) == 0 and _count(detector.backbone, nn.SyncBatchNorm) > 0
    detector.init_weights()
    loaded = detector.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
