"""The plan: which inference rewrites a model gets (FastPath), chosen by rule for a device and dtype."""

from __future__ import annotations

import dataclasses

import torch

from recnext_cli.fastpath.device import _onednn_runs


@dataclasses.dataclass(frozen=True)
class FastPath:
    """Which inference rewrites a model gets; with fp32, each keeps outputs within 1e-4 relative of the eager model."""

    fold_batchnorm: bool = True
    channels_last: bool = True
    onednn_fusion: bool = False
    compile: bool = False
    detector_heads: bool = False  # CPU rewrites of a detector's RoI extraction, mask upsampling and mask paste

    def __post_init__(self) -> None:
        if self.onednn_fusion and not (self.fold_batchnorm and self.channels_last):
            raise ValueError("oneDNN fusion rewrites folded, channels-last models only")

    def describe(self) -> str:
        """The rewrites in a few words, for the output of the commands that run a model."""
        steps = [
            label
            for label, on in (
                ("BatchNorm folded", self.fold_batchnorm),
                ("channels-last", self.channels_last),
                ("oneDNN conv+GELU / conv+add fusion, split channel-doubling convs", self.onednn_fusion),
                ("torch.compile", self.compile),
                ("Mask R-CNN heads: RoIAlign as channels-last gathers, mask upsampling as one matmul, batched mask "
                 "paste", self.detector_heads),
            )
            if on
        ]
        return ", ".join(steps) if steps else "published eager model (no rewrites)"


PUBLISHED = FastPath(fold_batchnorm=False, channels_last=False)


def choose_fast_path(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    fused: bool = True,
    compile: bool = False,
) -> FastPath:
    """The fastest rewrites for `device` and `dtype`, by rule; `fused=False` keeps the published structure.

    The rules come from single-process A/B timings of RecNeXt-M3/A3 on an AVX-512 Xeon (fp32, 1 and 2 threads):
    channels-last makes oneDNN's depthwise convolutions 2-3x faster than NCHW, and fusing GELU and the residual add
    into the 1x1 convolutions saves whole passes over the activations. Inductor does its own fusions, so compiled
    models keep only the rewrites it can trace. On CUDA, from in-turn timings of RecNeXt-M3 on an H100 at batch 1
    (benchmarks/cuda_fastpath.py; benchmarks/results/gpu/): launching kernels is most of an eager call, so folding
    pays (1.36x over eager) and channels-last costs more layout work than it saves (1.19x with it); once a CUDA graph
    has removed the launches (`compile`: torch.compile's "reduce-overhead" mode), the channels-last model runs in half
    the NCHW one's time (5.5x over eager vs 2.7x). On a CPU a Mask R-CNN's heads are rewritten as well
    (`recnext_cli.fast_detector`, same detections): mmcv's CPU RoIAlign is a scalar loop on one thread, and mmdet
    pastes each mask with a dozen small operations.
    """
    device = torch.device(device)
    if not fused:
        return PUBLISHED if not compile else dataclasses.replace(PUBLISHED, compile=True)
    if device.type == "cuda":
        return FastPath(channels_last=compile, compile=compile)
    onednn = torch.backends.mkldnn.is_available() and _onednn_runs(dtype)
    return FastPath(channels_last=onednn, onednn_fusion=onednn and not compile, compile=compile, detector_heads=True)
