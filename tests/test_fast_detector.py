"""The CPU detector rewrites (recnext_cli.fast_detector) compute what mmdet and mmcv compute."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="needs the mmdet stack (make setup)")

RELATIVE = 1e-5


@pytest.fixture(scope="module")
def mmdet_stack():
    from recnext_cli import compat

    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones)


def _rois(generator: torch.Generator, count: int, images: int, height: int, width: int, stride: int) -> torch.Tensor:
    """Boxes in image pixels: random ones of every size, plus ones that leave the map, are empty or are a sliver."""
    side = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * stride / 2
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * stride - side / 4
    boxes = torch.cat([corner, corner + side], dim=1)
    full_width, full_height = width * stride, height * stride
    edge_cases = torch.tensor([
        [-50.0, -50.0, 30.0, 30.0],  # starts outside the map
        [full_width - 10, full_height - 10, full_width + 90, full_height + 90],  # ends outside it
        [10.0, 10.0, 10.0, 10.0],  # no area: no samples
        [5.0, 5.0, full_width - 5, 9.0],  # a long sliver
        [0.0, 0.0, full_width, full_height],  # the whole map
        [-4 * full_width, 0.0, -2 * full_width, full_height],  # entirely outside: zeros
    ])
    boxes = torch.cat([boxes, edge_cases])
    image = torch.randint(images, (len(boxes), 1), generator=generator).float()
    return torch.cat([image, boxes], dim=1)


@pytest.mark.parametrize("output_size, sampling_ratio, aligned", [
    ((7, 7), 0, True), ((14, 14), 0, True), ((7, 7), 2, True), ((7, 7), 0, False), ((5, 3), 1, False),
])
def test_roi_align_equals_mmcv(mmdet_stack, output_size, sampling_ratio, aligned):
    from mmcv.ops import roi_align as mmcv_roi_align

    from recnext_cli.fast_detector import roi_align

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 25, 38, generator=generator)
    rois = _rois(generator, 200, images=2, height=25, width=38, stride=4)
    expected = mmcv_roi_align(features, rois, output_size, 0.25, sampling_ratio, "avg", aligned)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = roi_align([features.contiguous(memory_format=layout)], rois, output_size, [0.25], sampling_ratio,
                        aligned)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= RELATIVE * expected.abs().max()
    # A roi entirely outside the map gives zeros, as mmcv's does.
    assert not expected[-1].any() and not got[-1].any()


def test_roi_align_of_no_rois_is_empty(mmdet_stack):
    from recnext_cli.fast_detector import roi_align

    out = roi_align([torch.randn(1, 8, 10, 10)], torch.zeros(0, 5), (7, 7), [0.5], 0, True)
    assert out.shape == (0, 8, 7, 7)


def test_the_roi_extractor_equals_mmdets_on_every_level(mmdet_stack):
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    from recnext_cli.fast_detector import ChannelsLastRoIExtractor, replaceable_roi_extractor

    extractor = SingleRoIExtractor(dict(type="RoIAlign", output_size=7, sampling_ratio=0), out_channels=16,
                                   featmap_strides=[4, 8, 16, 32])
    assert replaceable_roi_extractor(extractor)
    generator = torch.Generator().manual_seed(1)
    # mmdet sends boxes of 448 pixels and more (square root of the area) to the coarsest level.
    feats = [torch.randn(1, 16, 896 // s, 1152 // s, generator=generator) for s in (4, 8, 16, 32)]
    rois = _rois(generator, 300, images=1, height=224, width=288, stride=4)
    levels = extractor.map_roi_levels(rois, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    expected = extractor(feats, rois)
    got = ChannelsLastRoIExtractor(extractor)([f.contiguous(memory_format=torch.channels_last) for f in feats], rois)
    assert (got - expected).abs().max() <= RELATIVE * expected.abs().max()


def _mask_heads(num_classes: int = 3):
    """A plain FCNMaskHead and the same head given InferenceFCNMaskHead's methods, with equal random weights."""
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead

    from recnext_cli.fast_detector import InferenceFCNMaskHead, speed_up_mask_head

    torch.manual_seed(3)
    plain = FCNMaskHead(num_convs=1, in_channels=8, conv_out_channels=8, num_classes=num_classes).eval()
    fast = copy.deepcopy(plain)
    roi_head = torch.nn.Module()
    roi_head.mask_head = fast
    speed_up_mask_head(roi_head)
    assert type(fast) is InferenceFCNMaskHead
    return plain, fast


def test_the_mask_head_upsamples_as_its_transposed_convolution_does(mmdet_stack):
    plain, fast = _mask_heads()
    features = torch.randn(5, 8, 14, 14, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = plain(features)
        got = fast(features.contiguous(memory_format=torch.channels_last))
        empty = fast(torch.zeros(0, 8, 14, 14))
    assert got.shape == expected.shape == (5, 3, 28, 28) and empty.shape == (0, 3, 28, 28)
    assert (got - expected).abs().max() <= RELATIVE * expected.abs().max()


@pytest.mark.parametrize("threshold, rescale", [(0.5, True), (0.5, False), (-1, True)])
def test_masks_are_pasted_exactly_as_mmdet_pastes_them(mmdet_stack, threshold, rescale):
    from mmcv import Config

    plain, fast = _mask_heads()
    generator = torch.Generator().manual_seed(5)
    count, height, width = 60, 90, 140
    # Detectors clip boxes to the image (mmdet's paste fails on a box wholly outside it); these reach a little beyond.
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) - 4
    size = torch.rand(count, 2, generator=generator) ** 3 * torch.tensor([width, height])
    boxes = torch.cat([corner, torch.minimum(corner + size, torch.tensor([width + 4.0, height + 4.0])),
                       torch.rand(count, 1, generator=generator)], dim=1)
    # A box of no width, one past the right edge, and one covering the whole image.
    boxes[:3, :4] = torch.tensor([[20.0, 20.0, 20.0, 50.0], [120.0, -3.0, 143.0, 30.0], [-2.0, -2.0, 142.0, 92.0]])
    logits = torch.randn(count, 3, 28, 28, generator=generator) * 4
    labels = torch.randint(3, (count,), generator=generator)
    scale_factor = np.array([1.25, 0.8, 1.25, 0.8], dtype=np.float32)
    # As the roi head hands them over: in the coordinates of the resized image the network saw.
    boxes[:, :4] *= torch.from_numpy(scale_factor)
    cfg = Config(dict(mask_thr_binary=threshold))
    shape = (height, width, 3)
    expected = plain.get_seg_masks(logits, boxes, labels, cfg, shape, scale_factor, rescale)
    got = fast.get_seg_masks(logits, boxes, labels, cfg, shape, scale_factor, rescale)
    assert [len(masks) for masks in got] == [len(masks) for masks in expected]
    painted = 0
    for class_masks, class_expected in zip(got, expected, strict=True):
        for mask, want in zip(class_masks, class_expected, strict=True):
            assert mask.dtype == want.dtype and mask.shape == want.shape
            assert np.array_equal(mask, want)
            painted += int(want.any())
    assert painted > count // 2


@pytest.fixture(scope="module")
def demo_detector(mmdet_stack):
    """The demo config's Mask R-CNN (RecNeXt-M0) with seeded random weights, trained-like BatchNorm statistics and
    heads that keep detections."""
    from mmcv import Config
    from mmdet.models import build_detector
    from torch.nn.modules.batchnorm import _BatchNorm

    from recnext_cli.bench import busy_heads
    from recnext_cli.zoo import CONFIG_ROOT

    cfg = Config.fromfile(str(CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"))
    cfg.model.train_cfg = None
    torch.manual_seed(0)
    detector = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return busy_heads(detector).eval()


def _detect(detector, images: torch.Tensor, original: tuple[int, int]):
    meta = {"ori_shape": (*original, 3), "img_shape": (*original, 3), "pad_shape": (*images.shape[2:], 3),
            "scale_factor": np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32), "flip": False, "flip_direction": None}
    with torch.inference_mode():
        return detector(return_loss=False, rescale=True, img=[images], img_metas=[[dict(meta) for _ in images]])


def test_the_fast_detector_finds_the_same_objects_and_masks(demo_detector):
    from recnext_cli.fast_detector import ChannelsLastRoIExtractor, InferenceFCNMaskHead
    from recnext_cli.fastpath import choose_fast_path, prepare_input, speed_up_detector

    images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(2))
    expected = _detect(demo_detector, images, (120, 150))
    plan = choose_fast_path("cpu")
    fast = speed_up_detector(copy.deepcopy(demo_detector), plan)
    assert isinstance(fast.roi_head.bbox_roi_extractor, ChannelsLastRoIExtractor)
    assert type(fast.roi_head.mask_head) is InferenceFCNMaskHead
    got = _detect(fast, prepare_input(images, plan), (120, 150))
    detections = 0
    for (boxes, masks), (want_boxes, want_masks) in zip(got, expected, strict=True):
        for class_boxes, class_want in zip(boxes, want_boxes, strict=True):
            assert class_boxes.shape == class_want.shape
            detections += len(class_want)
            np.testing.assert_allclose(class_boxes, class_want, atol=1e-3)
        for class_masks, class_want in zip(masks, want_masks, strict=True):
            assert len(class_masks) == len(class_want)
            for mask, want in zip(class_masks, class_want, strict=True):
                assert mask.dtype == want.dtype and np.array_equal(mask, want)
    # The demo config keeps at most 20 per image; the busy heads must fill that, or masks would go untested.
    assert detections == 40


def test_a_bf16_backbone_takes_the_pipelines_fp32_images_and_finds_nearly_the_same_objects(demo_detector):
    from recnext_cli.errors import UsageError
    from recnext_cli.fastpath import choose_fast_path, resolve_dtype, speed_up_detector

    try:
        dtype = resolve_dtype("bf16", torch.device("cpu"))
    except UsageError as exc:
        pytest.skip(str(exc))
    images = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(2))
    expected = _detect(demo_detector, images, (120, 150))
    fast = speed_up_detector(copy.deepcopy(demo_detector), choose_fast_path("cpu", dtype), dtype=dtype)
    assert next(fast.backbone.parameters()).dtype is torch.bfloat16
    ((boxes, masks),) = _detect(fast, images, (120, 150))
    assert sum(len(class_boxes) for class_boxes in boxes) == 20
    # bf16 keeps 8 bits of mantissa: the strongest detections stay where they were.
    best = max(range(3), key=lambda label: expected[0][0][label][:, 4].max(initial=0))
    assert len(boxes[best]) and np.abs(boxes[best][0, :4] - expected[0][0][best][0, :4]).max() < 4.0
