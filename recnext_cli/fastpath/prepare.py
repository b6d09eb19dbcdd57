"""Models and inputs made ready for the fast path: backbones, their inputs, and the backbone inside a detector."""

from __future__ import annotations

import torch
from torch import nn

from recnext_cli.fastpath.plan import FastPath, choose_fast_path
from recnext_cli.fastpath.rewrites import (
    _channels_last_attention,
    _onednn_fusion,
    _replace,
)
from recnext_cli.nn import fuse


@torch.no_grad()
def prepare_for_inference(
    model: nn.Module,
    plan: FastPath | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """`model` (changed in place, also returned) in eval mode on `device` in `dtype`, rewritten as `plan` says.

    `plan` defaults to `choose_fast_path(device, dtype)`. Feed inputs through `prepare_input` with the same plan.
    - fold_batchnorm: BatchNorms folded into convolutions (`recnext_cli.nn.fuse`).
    - channels_last: weights in NHWC memory format, and A-series attention computed token-major so that NHWC
      activations flow through without layout copies.
    - onednn_fusion (CPU): GELU and residual adds inside oneDNN convolutions, channel-doubling convs split in two.
    - compile: `torch.compile` — on CUDA with CUDA graphs (mode "reduce-overhead", so each call's outputs are
      overwritten by the next call), on CPU with inductor's weight freezing (`FrozenCompiled`; call it with gradients
      off). The first calls compile (minutes on a small CPU); see `warmup_calls`.
    - dtype: fp16/bf16 cast the whole model; outputs then differ from fp32 by the type's rounding.
    With fp32, outputs equal the eager unfused model's within 1e-4 relative.
    """
    device = torch.device(device)
    plan = plan or choose_fast_path(device, dtype)
    model.eval()
    if plan.fold_batchnorm:
        model = fuse(model)
    if plan.channels_last:
        model = _replace(model, _channels_last_attention)
    if plan.onednn_fusion:
        model = _replace(model, _onednn_fusion)
    model = model.to(device=device, dtype=dtype)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if plan.compile:
        if device.type == "cuda":
            model = torch.compile(model, mode="reduce-overhead")
        else:
            model = FrozenCompiled(torch.compile(model))
    return model


class FrozenCompiled(nn.Module):
    """A torch.compile'd CPU model whose compilations freeze its weights (for oneDNN prepacking and GELU fusion).

    torch 2.14 ignores `freezing` passed through torch.compile's `options`: it must be set in inductor's config
    while a call compiles, so it is set around every call, which recompilations then see too.
    """

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor):
        import torch._inductor.config

        with torch._inductor.config.patch(freezing=True):
            return self.compiled(x)


def prepare_input(
    x: torch.Tensor,
    plan: FastPath,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """`x` on `device` in `dtype`, in the memory format a model prepared with `plan` runs fastest on."""
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if plan.channels_last else x


class DetectorFeatures(nn.Module):
    """A prepared backbone inside a detector: images enter in `input_dtype` (None: as given), feature maps leave in
    `dtype` (None: as computed), in NCHW memory order unless `channels_last` says the detector reads channels-last
    maps correctly.

    mmcv 1.7's CPU RoIAlign indexes its input's data pointer as contiguous NCHW without checking, so channels-last
    features reaching it through FPN would be read wrongly; `fast_detector.roi_align` reads them in place. A bf16
    backbone takes the fp32 images mmdet's pipeline gives and hands fp32 features to an fp32 detector.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        input_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dtype = dtype
        self.input_dtype = input_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x.to(dtype=self.input_dtype or x.dtype))
        return [
            feature.to(dtype=self.dtype or feature.dtype).contiguous(memory_format=self.memory_format)
            for feature in features
        ]


@torch.no_grad()
def speed_up_detector(
    detector: nn.Module,
    plan: FastPath | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """An mmdet detector (changed in place, also returned) with its RecNeXt backbone prepared as `plan` says.

    `plan` defaults to `choose_fast_path(device, dtype)`. Feed images through `prepare_input` with the same plan.
    With bf16 on a CPU only the backbone runs in bf16 (the rest of the detector gets fp32 features); fp16 casts
    the backbone and leaves the rest to mmdet's own fp16 mode.
    """
    from recnext_cli.nn import RecNeXt

    device = torch.device(device)
    plan = plan or choose_fast_path(device, dtype)
    detector.eval()
    channels_last_features = False
    if plan.detector_heads:
        from recnext_cli.fast_detector import speed_up_heads

        channels_last_features = speed_up_heads(detector)
    if isinstance(detector.backbone, RecNeXt):
        backbone = prepare_for_inference(detector.backbone, plan, dtype=dtype, device=device)
        bf16 = dtype is torch.bfloat16
        detector.backbone = DetectorFeatures(
            backbone,
            dtype=torch.float32 if bf16 else None,
            channels_last=channels_last_features and plan.channels_last,
            input_dtype=dtype if bf16 else None,
        )
    return detector.to(device)
