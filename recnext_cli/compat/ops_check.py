"""The answers mmcv's own unit tests publish for RoIAlign and NMS, checked against whichever kernels are in use.

The numbers are those of mmcv 1.x's `tests/test_ops/test_roi_align.py` and `test_nms.py`: small inputs whose exact
outputs (and, for RoIAlign, input gradients under an all-ones upstream gradient) the mmcv authors worked out.
`recnext doctor` and the tests both hold the active provider to them, on the CPU and, where present, on the GPU.
"""

from __future__ import annotations

# (features NCHW, rois (batch index, x1, y1, x2, y2), pooled output, gradient of the features), for a 2x2 output,
# spatial_scale 1, sampling_ratio 2, aligned=True, average pooling.
ROI_ALIGN_CASES = (
    (
        [[[[1.0, 2.0], [3.0, 4.0]]]],
        [[0.0, 0.0, 0.0, 1.0, 1.0]],
        [[[[1.0, 1.25], [1.5, 1.75]]]],
        [[[[3.0625, 0.4375], [0.4375, 0.0625]]]],
    ),
    (
        [[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]]]],
        [[0.0, 0.0, 0.0, 1.0, 1.0]],
        [[[[1.0, 1.25], [1.5, 1.75]], [[4.0, 3.75], [3.5, 3.25]]]],
        [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]],
    ),
    (
        [[[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0], [9.0, 10.0, 13.0, 14.0], [11.0, 12.0, 15.0, 16.0]]]],
        [[0.0, 0.0, 0.0, 3.0, 3.0]],
        [[[[1.9375, 4.75], [7.5625, 10.375]]]],
        [[[[0.47265625, 0.4296875, 0.4296875, 0.04296875],
           [0.4296875, 0.390625, 0.390625, 0.0390625],
           [0.4296875, 0.390625, 0.390625, 0.0390625],
           [0.04296875, 0.0390625, 0.0390625, 0.00390625]]]],
    ),
)
ROI_ALIGN_TOLERANCE = 1e-3  # what mmcv's test allows

# Four boxes, NMS at IoU 0.3 with offset 0: kept indices, highest score first, and the kept (box, score) rows.
NMS_BOXES = [[6.0, 3.0, 8.0, 7.0], [3.0, 6.0, 9.0, 11.0], [3.0, 7.0, 10.0, 12.0], [1.0, 4.0, 13.0, 7.0]]
NMS_SCORES = [0.6, 0.9, 0.7, 0.2]
NMS_KEPT = [1, 0, 3]
NMS_DETS = [[3.0, 6.0, 9.0, 11.0, 0.9], [6.0, 3.0, 8.0, 7.0, 0.6], [1.0, 4.0, 13.0, 7.0, 0.2]]


def _roi_align(device: str) -> tuple[str | None, str | None]:
    import torch
    from mmcv.ops import roi_align

    forward = backward = None
    for number, (features, rois, pooled, gradient) in enumerate(ROI_ALIGN_CASES, 1):
        x = torch.tensor(features, device=device, requires_grad=True)
        out = roi_align(x, torch.tensor(rois, device=device), (2, 2), 1.0, 2, "avg", True)
        out.backward(torch.ones_like(out))
        if not torch.allclose(out.detach().cpu(), torch.tensor(pooled), atol=ROI_ALIGN_TOLERANCE):
            forward = forward or f"case {number} pooled {out.detach().cpu().flatten().tolist()}"
        if not torch.allclose(x.grad.cpu(), torch.tensor(gradient), atol=ROI_ALIGN_TOLERANCE):
            backward = backward or f"case {number} gradient {x.grad.cpu().flatten().tolist()}"
    return forward, backward


def _nms(device: str) -> tuple[str | None, str | None]:
    import torch
    from mmcv.ops import batched_nms, nms

    boxes, scores = torch.tensor(NMS_BOXES, device=device), torch.tensor(NMS_SCORES, device=device)
    dets, kept = nms(boxes, scores, iou_threshold=0.3, offset=0)
    plain = None
    if kept.cpu().tolist() != NMS_KEPT or not torch.allclose(dets.cpu(), torch.tensor(NMS_DETS)):
        plain = f"kept {kept.cpu().tolist()}, expected {NMS_KEPT}"
    # One class each: nothing overlaps across classes, so class-aware NMS keeps every box, by score.
    classes = torch.arange(4, device=device)
    _, batched = batched_nms(boxes, scores, classes, {"type": "nms", "iou_threshold": 0.3})
    expected = sorted(range(4), key=lambda i: -NMS_SCORES[i])
    by_class = None if batched.cpu().tolist() == expected else f"kept {batched.cpu().tolist()}, expected {expected}"
    return plain, by_class


def published_answers() -> dict[str, str | None]:
    """For RoIAlign forward/backward, nms and batched_nms: None when every device here gives mmcv's answers."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    found: dict[str, str | None] = dict.fromkeys(("RoIAlign forward", "RoIAlign backward", "nms", "batched_nms"))
    for device in devices:
        try:
            results = (*_roi_align(device), *_nms(device))
        except Exception as exc:  # a missing kernel for this device, among others
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            results = (message,) * 4
        for op, problem in zip(found, results):
            if problem is not None and found[op] is None:
                found[op] = f"{device}: {problem}"
    return found
