"""Seeded RoIAlign / NMS / detector cases, and the script that records mmcv-full's compiled answers to them.

The tests run the same cases through recnext's torchvision provider and compare with the recorded file, so the
provider is held to mmcv's own kernels on machines that never compile them. To record again (after changing a case):

    .venv/bin/recnext setup --compile-ops
    RECNEXT_MMCV_OPS=compiled .venv/bin/python tests/mmcv_ops_reference.py record
    .venv/bin/recnext setup --force-rebuild          # back to the default, Python-only mmcv
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).parent / "data" / "mmcv_ops_reference.npz"

# RoIAlign on FPN-like levels of one 128x160 image pair: (level stride, feature height, feature width).
LEVELS = ((4, 32, 40), (8, 16, 20), (16, 8, 10))
OUTPUT_SIZES = (7, 14)
ALIGNED = (True, False)
SAMPLING_RATIOS = (0, 2)
CHANNELS = 2
# NMS inputs: box counts from empty to past batched_nms's default split_thr (10,000).
NMS_COUNTS = (0, 300, 2000, 12000)
NMS_THRESHOLDS = (0.3, 0.5, 0.7)
CLASSES = 5


def roi_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261126)
    inputs = {f"features_s{stride}": rng.standard_normal((2, CHANNELS, h, w)).astype(np.float32)
              for stride, h, w in LEVELS}
    count = 12
    x1 = rng.uniform(-8, 150, count)
    y1 = rng.uniform(-8, 120, count)
    sizes = rng.uniform(0.3, 70, (count, 2))  # some RoIs below a pixel, some past the image edge
    rois = np.stack([rng.integers(0, 2, count), x1, y1, x1 + sizes[:, 0], y1 + sizes[:, 1]], axis=1)
    inputs["rois"] = rois.astype(np.float32)
    return inputs


def roi_cases():
    """(key, stride, output size, aligned, sampling ratio) for every combination."""
    for (stride, _, _), size, aligned, ratio in itertools.product(LEVELS, OUTPUT_SIZES, ALIGNED, SAMPLING_RATIOS):
        yield f"s{stride}_o{size}_a{int(aligned)}_r{ratio}", stride, size, aligned, ratio


def upstream_gradient(shape) -> "torch.Tensor":  # noqa: F821
    """A fixed, exactly representable gradient pattern (no RNG, no transcendental functions)."""
    import torch

    count = int(np.prod(shape))
    return (((torch.arange(count) % 7) - 3).float() / 4).reshape(shape)


def run_roi_align(inputs, stride, size, aligned, ratio, entry="function"):
    """Pooled output and feature gradient through mmcv's `roi_align` function or its `RoIAlign` class."""
    import torch
    from mmcv.ops import RoIAlign, roi_align

    features = torch.from_numpy(inputs[f"features_s{stride}"].copy()).requires_grad_(True)
    rois = torch.from_numpy(inputs["rois"].copy())
    if entry == "function":
        out = roi_align(features, rois, size, 1.0 / stride, ratio, "avg", aligned)
    else:
        out = RoIAlign(size, 1.0 / stride, ratio, "avg", aligned)(features, rois)
    out.backward(upstream_gradient(out.shape))
    return out.detach().numpy(), features.grad.numpy()


def nms_inputs() -> dict[str, np.ndarray]:
    """Boxes in clusters (so that NMS has work to do), distinct random scores, a class per box."""
    rng = np.random.default_rng(7)
    count = max(NMS_COUNTS)
    centres = rng.uniform(0, 1000, (count // 20, 2))
    which = rng.integers(0, len(centres), count)
    xy = centres[which] + rng.normal(0, 6, (count, 2))
    wh = rng.uniform(8, 80, (count, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return {"boxes": boxes, "scores": rng.permutation(count).astype(np.float32) / count + 1e-3,
            # Equal scores, as an RPN gives to anchors over padding: the order boxes are visited in matters.
            "tied_scores": np.floor(rng.uniform(0, 16, count)).astype(np.float32) / 16,
            "labels": rng.integers(0, CLASSES, count).astype(np.int64)}


def nms_cases():
    """(key, box count, IoU threshold, offset, scores) for mmcv.ops.nms."""
    for count, threshold, offset, scores in itertools.product(NMS_COUNTS, NMS_THRESHOLDS, (0, 1),
                                                              ("scores", "tied_scores")):
        yield f"n{count}_t{threshold}_o{offset}_{scores}", count, threshold, offset, scores


def batched_cases():
    """(key, box count, class agnostic, scores) for mmcv.ops.batched_nms; 12000 boxes take its per-class split path.

    No empty case: mmcv's batched_nms itself fails on no boxes (`boxes.max()`), and mmdet checks before calling it."""
    for count, agnostic, scores in itertools.product([n for n in NMS_COUNTS if n], (False, True),
                                                     ("scores", "tied_scores")):
        yield f"n{count}_agn{int(agnostic)}_{scores}", count, agnostic, scores


def run_nms(inputs, count, threshold, offset, scores_key):
    import torch
    from mmcv.ops import nms

    boxes, scores = torch.from_numpy(inputs["boxes"][:count]), torch.from_numpy(inputs[scores_key][:count])
    dets, kept = nms(boxes, scores, threshold, offset=offset)
    return dets.numpy(), kept.numpy()


def run_batched_nms(inputs, count, agnostic, scores_key):
    import torch
    from mmcv.ops import batched_nms

    boxes, scores = torch.from_numpy(inputs["boxes"][:count]), torch.from_numpy(inputs[scores_key][:count])
    labels = torch.from_numpy(inputs["labels"][:count])
    dets, kept = batched_nms(boxes, scores, labels, {"type": "nms", "iou_threshold": 0.5}, class_agnostic=agnostic)
    return dets.numpy(), kept.numpy()


def detector_image() -> np.ndarray:
    """A 20x30 RGB pattern, blown up 16x by the test below into a 320x480 input."""
    return np.random.default_rng(3).integers(0, 256, (20, 30, 3)).astype(np.uint8)


def run_detector(image: np.ndarray) -> dict[str, np.ndarray]:
    """The published M3 Mask R-CNN with seeded weights on `image`: its boxes, labels and masks (bit-packed)."""
    import torch
    from mmcv import Config
    from mmdet.models import build_detector

    from recnext_cli import compat
    from recnext_cli.models import config_file

    compat.apply_all()
    cfg = Config.fromfile(str(config_file("m3")))
    cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg = None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        detector = build_detector(cfg.model, test_cfg=cfg.get("test_cfg")).eval()
        # Default initialisation scores every class near 1/81, under the 0.05 threshold: spread the class logits
        # so that boxes survive to NMS and the mask head.
        torch.nn.init.normal_(detector.roi_head.bbox_head.fc_cls.weight, std=0.3)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    pixels = torch.nn.functional.interpolate(pixels, scale_factor=16, mode="nearest")
    pixels = (pixels - 120.0) / 60.0
    height, width = pixels.shape[-2:]
    meta = {"img_shape": (height, width, 3), "ori_shape": (height, width, 3), "pad_shape": (height, width, 3),
            "scale_factor": np.ones(4, dtype=np.float32), "flip": False}
    with torch.inference_mode():
        ((boxes_per_class, masks_per_class),) = detector.simple_test(pixels, [meta], rescale=True)
    boxes = np.concatenate(boxes_per_class).astype(np.float32)
    labels = np.concatenate([np.full(len(b), k) for k, b in enumerate(boxes_per_class)]).astype(np.int64)
    masks = np.stack([np.asarray(mask, dtype=bool) for per_class in masks_per_class for mask in per_class])
    return {"boxes": boxes, "labels": labels, "masks": np.packbits(masks, axis=-1), "mask_shape": np.array(masks.shape)}


def compute() -> dict[str, np.ndarray]:
    """Every case's inputs and answers, from whichever `mmcv._ext` this process imports."""
    arrays: dict[str, np.ndarray] = {}
    roi = roi_inputs()
    arrays.update({f"roi_in__{k}": v for k, v in roi.items()})
    for key, stride, size, aligned, ratio in roi_cases():
        arrays[f"roi_out__{key}"], arrays[f"roi_grad__{key}"] = run_roi_align(roi, stride, size, aligned, ratio)
        class_out, class_grad = run_roi_align(roi, stride, size, aligned, ratio, entry="class")
        arrays[f"roi_classout__{key}"], arrays[f"roi_classgrad__{key}"] = class_out, class_grad
    boxes = nms_inputs()
    arrays.update({f"nms_in__{k}": v for k, v in boxes.items()})
    for key, *case in nms_cases():
        arrays[f"nms_dets__{key}"], arrays[f"nms_keep__{key}"] = run_nms(boxes, *case)
    for key, *case in batched_cases():
        arrays[f"bnms_dets__{key}"], arrays[f"bnms_keep__{key}"] = run_batched_nms(boxes, *case)
    image = detector_image()
    arrays["det_in__image"] = image
    arrays.update({f"det_out__{k}": v for k, v in run_detector(image).items()})
    return arrays


def main(argv: list[str]) -> None:
    """`record` writes the reference from a compiled build; `compute OUT` writes the active kernels' answers."""
    from recnext_cli.compat.ext_hook import active_provider

    import mmcv.ops  # noqa: F401

    provider = active_provider()
    if argv[:1] == ["record"]:
        if provider != "compiled":
            sys.exit("mmcv._ext is recnext's provider here: run `recnext setup --compile-ops` and set "
                     "RECNEXT_MMCV_OPS=compiled, then record again")
        target = REFERENCE
    elif argv[:1] == ["compute"] and len(argv) == 2:
        target = Path(argv[1])
    else:
        sys.exit("usage: mmcv_ops_reference.py record | compute OUT.npz")
    arrays = compute()
    if target == REFERENCE:
        # Keep the file small: what the kernels decide (pooled values, gradients, kept indices), not what mmcv's
        # Python wrappers derive from it (the class entry point, the dets rows).
        arrays = {key: value for key, value in arrays.items() if "dets__" not in key and "class" not in key}
    arrays["provider"] = np.array(provider)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, **arrays)
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB, {len(arrays)} arrays, "
          f"{len(arrays['det_out__labels'])} detections, provider {provider})")


if __name__ == "__main__":
    main(sys.argv[1:])
