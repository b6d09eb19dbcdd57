"""A compiled mmcv build without CUDA kernels on a GPU machine: its RoIAlign and NMS calls on GPU tensors go to
torchvision.

Only `recnext setup --compile-ops` on a machine without nvcc produces such a build (the default set-up has no compiled
extension at all; see `ext_hook`). mmcv's ops modules call their module-level `ext_module`, which every entry point
shares: the `RoIAlign` class, the `roi_align` function mmdet's mask targets call, `nms` and `batched_nms`. Replacing
that attribute with a router covers all of them, forward and backward.
"""

from __future__ import annotations

import importlib

from recnext_cli.compat._util import is_marked, mark

# The mmcv modules whose compiled calls Mask R-CNN makes, and the calls the provider can take over.
ROUTED = {"mmcv.ops.roi_align": ("roi_align_forward", "roi_align_backward"), "mmcv.ops.nms": ("nms",)}


def compiled_ext():
    """The compiled `mmcv._ext` in use, or None when recnext's provider stands in for it."""
    import mmcv.ops  # noqa: F401  (imports mmcv._ext through whichever finder answers)

    from recnext_cli.compat.ext_hook import active_provider

    return None if active_provider() == "torchvision" else importlib.import_module("mmcv._ext")


def mmcv_has_cuda_ops() -> bool:
    ext = compiled_ext()
    return ext is not None and ext.get_compiling_cuda_version() not in ("not available", "", None)


def fallback_needed() -> bool:
    import torch

    return torch.cuda.is_available() and compiled_ext() is not None and not mmcv_has_cuda_ops()


class DeviceRouter:
    """Stands in for a compiled extension inside an mmcv ops module: calls whose tensors are not on the CPU go to the
    torchvision provider, the rest to the compiled kernels."""

    def __init__(self, compiled, routed: tuple[str, ...]):
        self._compiled = compiled
        self._routed = routed

    def __getattr__(self, name):
        kernel = getattr(self._compiled, name)
        if name not in self._routed:
            return kernel
        from recnext_cli.compat import mmcv_ext

        provided = getattr(mmcv_ext, name)

        def route(first, *args, **kwargs):
            return (kernel if first.device.type == "cpu" else provided)(first, *args, **kwargs)

        return route


def patched() -> bool:
    return all(is_marked(importlib.import_module(name).ext_module) for name in ROUTED)


def patch() -> None:
    for name, routed in ROUTED.items():
        module = importlib.import_module(name)
        if not is_marked(module.ext_module):
            module.ext_module = mark(DeviceRouter(module.ext_module, routed), module.ext_module)


def check() -> str | None:
    """Make the calls that fail without the router (RoIAlign forward/backward and batched NMS on a GPU) and compare
    them with the CPU kernels; None when they agree."""
    import torch
    from mmcv.ops import batched_nms, roi_align

    try:
        features = torch.rand((1, 2, 16, 16), generator=torch.Generator().manual_seed(0))
        rois = torch.tensor([[0.0, 1.0, 2.0, 9.0, 12.0], [0.0, 4.0, 0.5, 15.0, 7.5]])
        results = []
        for device in ("cpu", "cuda"):
            x = features.to(device, copy=True).requires_grad_(True)  # a fresh leaf per device
            out = roi_align(x, rois.to(device), 7, 1.0, 0, "avg", True)
            out.sum().backward()
            boxes = torch.cat([rois[:, 1:3], rois[:, 3:] + 1], 1).repeat(3, 1).to(device)
            _, kept = batched_nms(boxes, torch.arange(6.0, device=device), torch.zeros(6, device=device),
                                  {"iou_threshold": 0.5})
            results.append((out.detach().cpu(), x.grad.cpu(), kept.cpu()))
    except Exception as exc:  # the compiled kernels' "implementation for device cuda:0 not found" among others
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    (cpu_out, cpu_grad, cpu_kept), (gpu_out, gpu_grad, gpu_kept) = results
    if not (torch.allclose(cpu_out, gpu_out, atol=1e-5) and torch.allclose(cpu_grad, gpu_grad, atol=1e-5)):
        return "RoIAlign on the GPU disagrees with the CPU kernels"
    return None if torch.equal(cpu_kept, gpu_kept) else "NMS on the GPU keeps other boxes than the CPU kernels"
