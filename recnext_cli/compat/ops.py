"""RoIAlign and NMS on torchvision's CUDA kernels when mmcv-full was compiled without CUDA.

Mask R-CNN needs only two compiled mmcv ops; torchvision ships CUDA kernels for both (roi_align with `aligned`
and adaptive sampling, and nms), so a CPU-ops mmcv build still runs detection on a GPU.
"""

from __future__ import annotations

import importlib

from recnext_cli.compat._util import is_marked, mark


def mmcv_has_cuda_ops() -> bool:
    from mmcv.ops import get_compiling_cuda_version

    return get_compiling_cuda_version() not in ("not available", "", None)


def fallback_needed() -> bool:
    import torch

    return torch.cuda.is_available() and not mmcv_has_cuda_ops()


def torchvision_roi_align(layer, features, rois):
    """What mmcv's RoIAlign layer computes (average pooling), evaluated by torchvision's kernel."""
    from torchvision.ops import roi_align

    return roi_align(features, rois, layer.output_size, layer.spatial_scale, layer.sampling_ratio, layer.aligned)


def torchvision_nms(boxes, scores, iou_threshold: float):
    from torchvision.ops import nms

    return nms(boxes, scores, float(iou_threshold))


class _NmsExtension:
    """Stands in for mmcv's compiled extension inside mmcv.ops.nms, sending CUDA tensors to torchvision."""

    def __init__(self, ext):
        self._ext = ext

    def nms(self, boxes, scores, iou_threshold, offset=0):
        # torchvision has no `offset` (the legacy +1 box width); mmdet 2.x detectors all use offset 0.
        if boxes.is_cuda and offset == 0:
            return torchvision_nms(boxes, scores, iou_threshold)
        return self._ext.nms(boxes, scores, iou_threshold=iou_threshold, offset=offset)

    def __getattr__(self, name):
        return getattr(self._ext, name)


def patched() -> bool:
    from mmcv.ops import RoIAlign

    return is_marked(RoIAlign.forward)


def patch() -> None:
    from mmcv.ops import RoIAlign

    # `import mmcv.ops.nms as m` would bind the nms function that mmcv.ops re-exports, not the module.
    nms_module = importlib.import_module("mmcv.ops.nms")

    original_forward = RoIAlign.forward

    def forward(self, input, rois):
        if input.is_cuda and self.pool_mode == "avg":
            return torchvision_roi_align(self, input, rois)
        return original_forward(self, input, rois)

    RoIAlign.forward = mark(forward, original_forward)
    proxy = _NmsExtension(nms_module.ext_module)
    mark(proxy, nms_module.ext_module)
    nms_module.ext_module = proxy
