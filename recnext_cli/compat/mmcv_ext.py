"""mmcv's compiled `_ext` functions that Mask R-CNN calls (RoIAlign, NMS), computed by torchvision's kernels.

mmcv 1.7's ops modules do `ext_module = load_ext('_ext', [...])` at import and call `ext_module.<op>(...)` with
pybind11's keyword arguments. This module offers the same names and signatures, so `mmcv.ops.roi_align`,
`mmcv.ops.RoIAlign`, `mmcv.ops.nms` and `mmcv.ops.batched_nms` run unchanged on CPU and CUDA tensors without a C++
build. Every other op of the extension resolves to a function that raises `MissingCompiledOp` when called, so
`import mmcv.ops` works and the failure names the op and the remedy. `ext_hook` installs this as `mmcv._ext` where no
compiled extension exists; `compat.ops` routes a compiled build's CUDA calls here when it lacks CUDA kernels.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)

from recnext_cli.errors import EnvironmentProblem

PROVIDER = "torchvision"
# What this module computes, by mmcv op name; `recnext doctor` lists them.
PROVIDED_OPS = ("roi_align_forward", "roi_align_backward", "nms")
# mmcv's RoIAlignFunction encodes pool_mode as 0 = max, 1 = avg; torchvision only averages (mmdet always averages).
_AVERAGE = 1


class MissingCompiledOp(EnvironmentProblem, NotImplementedError):
    """An mmcv op that only mmcv-full's compiled extension provides."""


def missing_op(name: str):
    def unavailable(*args, **kwargs):
        raise MissingCompiledOp(
            f"mmcv op `{name}` needs mmcv-full's compiled kernels, which this set-up does not build (recnext provides "
            "only RoIAlign and NMS, from torchvision): run `recnext setup --compile-ops`"
        )

    unavailable.__name__ = name
    unavailable.__qualname__ = name
    return unavailable


def get_compiler_version() -> str:
    return f"none: RoIAlign and NMS from torchvision {torchvision.__version__} (recnext)"


def get_compiling_cuda_version() -> str:
    # mmcv's own answer for a build without CUDA kernels; the provider's CUDA support comes from torchvision instead.
    return "not available"


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width, spatial_scale,
                      sampling_ratio, pool_mode, aligned):
    """Fill `output` (rois, channels, aligned_height, aligned_width) with bin averages, as mmcv's kernel does."""
    if pool_mode != _AVERAGE:
        missing_op("roi_align_forward (pool_mode='max')")()
    output.copy_(torch.ops.torchvision.roi_align(
        input, rois, float(spatial_scale), int(aligned_height), int(aligned_width), int(sampling_ratio), bool(aligned)
    ))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width,
                       spatial_scale, sampling_ratio, pool_mode, aligned):
    """Fill `grad_input` (the feature map's shape) with the gradient of the average pooling."""
    if pool_mode != _AVERAGE:
        missing_op("roi_align_backward (pool_mode='max')")()
    batch, channels, height, width = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, float(spatial_scale), int(aligned_height), int(aligned_width),
        batch, channels, height, width, int(sampling_ratio), bool(aligned),
    ))


def nms(boxes, scores, iou_threshold, offset=0):
    """Indices of the kept boxes, highest score first, as mmcv's `nms` kernel returns them."""
    if offset != 0:
        return _nms_with_offset(boxes, scores, float(iou_threshold), int(offset))
    # Equal scores are common (an RPN scores padding alike). mmcv visits boxes in the order of torch's default sort,
    # torchvision in a stable sort's: handing torchvision the boxes already in mmcv's order makes the two agree.
    order = scores.sort(0, descending=True)[1]
    return order[torch.ops.torchvision.nms(boxes[order], scores[order], float(iou_threshold))]


def _nms_with_offset(boxes, scores, iou_threshold: float, offset: int):
    """Greedy NMS where a box spans x2 - x1 + offset pixels (mmdet 1.x's legacy convention, offset=1).

    torchvision has no offset. This follows mmcv's CPU kernel step for step in float32 (same sort, same arithmetic
    order), so the kept indices are the ones it returns. Run on the CPU: it is a legacy path, loop-bound either way.
    """
    if boxes.numel() == 0:
        return boxes.new_empty((0,), dtype=torch.long)
    order = scores.sort(0, descending=True)[1]
    sorted_boxes = boxes[order].detach().cpu().float().numpy()
    x1, y1, x2, y2 = (np.ascontiguousarray(sorted_boxes[:, k]) for k in range(4))
    areas = (x2 - x1 + np.float32(offset)) * (y2 - y1 + np.float32(offset))
    keep = np.ones(len(areas), dtype=bool)
    threshold = np.float32(iou_threshold)
    for i in range(len(areas)):
        if not keep[i]:
            continue
        rest = slice(i + 1, None)
        width = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + np.float32(offset))
        height = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + np.float32(offset))
        inter = width * height
        overlap = inter / (areas[i] + areas[rest] - inter)
        keep[rest] &= ~(overlap > threshold)
    return order[torch.from_numpy(keep).to(order.device)]


def __getattr__(name: str):
    # Any other op of mmcv's extension: importable (mmcv.ops checks names at import), refused when called.
    if name.startswith("__"):
        raise AttributeError(name)
    return missing_op(name)
