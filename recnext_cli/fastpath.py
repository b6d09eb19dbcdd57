"""The inference fast path: a RecNeXt model rewritten for latency with outputs equal to the eager fp32 model's."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from recnext_cli.errors import EnvironmentProblem, UsageError
from recnext_cli.nn import ABlock, Downsample, LinearAttention, MBlock, RecAttn, Stem, fuse

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_device(device: str) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1") as a torch.device, refusing a GPU that torch cannot see."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu or cuda") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem("--device cuda, but torch sees no GPU here; run with --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"{device} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return resolved


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for "fp32", "fp16" or "bf16", refusing a half type that `device` cannot run at speed."""
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
    if dtype is torch.float32:
        return dtype
    if device.type == "cuda":
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UsageError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16 or fp32")
        return dtype
    if dtype is torch.bfloat16 and not BF16_CPU_FLAGS & cpu_flags():
        # oneDNN runs bf16 on any AVX-512 CPU, but without these instructions it converts in software: slower than fp32.
        raise UsageError("--dtype bf16 needs a CPU with avx512_bf16 or AMX, which this one lacks; use --dtype fp32")
    if not _onednn_runs(dtype):
        # Without oneDNN support the convolutions fall back to scalar reference kernels, and their timings mean nothing.
        alternative = " or bf16" if dtype is torch.float16 and _onednn_runs(torch.bfloat16) else ""
        raise UsageError(
            f"--dtype {name} on this CPU has no fast convolution kernels (oneDNN needs AVX512-FP16 or AVX-NE-CONVERT "
            f"for fp16, avx512_bf16 or AMX for bf16); use --dtype fp32{alternative}"
        )
    return dtype


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the kernel reports for this CPU (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _onednn_runs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    probe = torch.ones(1, 1, 1, 1, dtype=dtype)
    try:
        torch.mkldnn_convolution(probe, probe, None, [0, 0], [1, 1], [1, 1], 1)
    except RuntimeError:
        return False
    return True


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


class OneDnnConv(nn.Module):
    """A Conv2d run by oneDNN with GELU or a residual add applied inside the convolution, not as separate passes.

    `torch.ops.mkldnn._convolution_pointwise` is the kernel inductor emits for these fusions on CPU; eager code can
    call it too. oneDNN's GELU is the exact erf form, as nn.GELU's default. The weight is reordered into oneDNN's
    own layout at the first call, for that call's input shape, instead of at every call (up to a tenth of a 1x1
    convolution's time); other shapes stay correct, oneDNN then reorders as it needs.
    """

    def __init__(self, conv: nn.Conv2d, gelu: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.gelu = gelu
        self.packed: torch.Tensor | None = None

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or self.packed.dtype != self.weight.dtype:
            self.packed = torch.ops.mkldnn._reorder_convolution_weight(self.weight, *self.geometry, list(x.shape))
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._packed_weight(x)
        if self.gelu:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *self.geometry, "gelu", [], "none")
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *self.geometry, "none", [], None)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """conv(x) + residual in one kernel."""
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self._packed_weight(x), self.bias, *self.geometry, "add", 1.0, None, [], None
        )


class FusedMlp(nn.Module):
    """The folded channel mixer (1x1 conv, GELU, 1x1 conv) as two oneDNN kernels, the second one adding a residual."""

    def __init__(self, mixer: nn.Sequential) -> None:
        super().__init__()
        expand, _gelu, project = mixer
        self.expand = OneDnnConv(expand, gelu=True)
        self.project = OneDnnConv(project)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.expand(x)
        return self.project(hidden) if residual is None else self.project.plus(hidden, residual)


class SplitChannelDoublingConv(nn.Module):
    """A grouped conv with one input and two output channels per group, as two depthwise convs interleaved.

    oneDNN (3.x) has no fast kernel for channel-doubling grouped convolutions: the Downsample token mixer ran 5x
    slower than the same work as two true depthwise convolutions (even and odd output channels) and one interleave.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.even = _conv_slice(conv, slice(0, None, 2))
        self.odd = _conv_slice(conv, slice(1, None, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even, odd = self.even(x), self.odd(x)
        b, c, h, w = even.shape
        return torch.stack((_nhwc(even), _nhwc(odd)), dim=-1).reshape(b, h, w, 2 * c).permute(0, 3, 1, 2)


def _conv_slice(conv: nn.Conv2d, channels: slice) -> nn.Conv2d:
    weight = conv.weight[channels]
    depthwise = nn.Conv2d(
        conv.in_channels,
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    depthwise.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if conv.bias is not None:
        depthwise.bias = nn.Parameter(conv.bias[channels].detach().clone(), requires_grad=False)
    return depthwise


class FusedResidualBlock(nn.Module):
    """An M or A block, x + channel_mixer(token_mixer(x)), with the residual added inside the last convolution."""

    def __init__(self, block: MBlock | ABlock) -> None:
        super().__init__()
        self.token_mixer = block.token_mixer
        self.channel_mixer = FusedMlp(block.channel_mixer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x), residual=x)


class FusedDownsample(nn.Module):
    """Downsample (folded): y = token_mixer(x); y + channel_mixer(y), with the add inside the last convolution."""

    def __init__(self, downsample: Downsample) -> None:
        super().__init__()
        self.token_mixer = SplitChannelDoublingConv(downsample.token_mixer)
        self.channel_mixer = FusedMlp(downsample.channel_mixer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.token_mixer(x)
        return self.channel_mixer(y, residual=y)


class FusedStem(nn.Module):
    """The folded stem with its GELU inside the first convolution."""

    def __init__(self, stem: Stem) -> None:
        super().__init__()
        first, _gelu, second = stem.stem
        self.first = OneDnnConv(first, gelu=True)
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def _onednn_fusion(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
        # aten runs a grouped (not depthwise) conv as one THNN call per group plus a concatenation.
        return OneDnnConv(module)
    if isinstance(module, (MBlock, ABlock)):
        return FusedResidualBlock(module)
    if isinstance(module, Downsample):
        return FusedDownsample(module)
    if isinstance(module, Stem):
        return FusedStem(module)
    return module


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """A (b, c, h, w) channels-last tensor as the (b, h, w, c) contiguous tensor it is in memory: a view."""
    return x.permute(0, 2, 3, 1)


class ChannelsLastLinearAttention(nn.Module):
    """LinearAttention computed token-major, so channels-last tensors are read and written without layout copies."""

    def __init__(self, attention: LinearAttention) -> None:
        super().__init__()
        self.heads = attention.heads
        self.qk = attention.qk
        self.pe = attention.pe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        head_dim = c // self.heads
        s = n**-0.5
        qk = _nhwc(F.elu(self.qk(x)) + 1.0).reshape(b, n, 2, self.heads, head_dim)
        q, k = qk.unbind(dim=2)
        v = _nhwc(x).reshape(b, n, self.heads, head_dim)
        kv = torch.einsum("bnhd,bnhe->bhde", k * s, v * s)
        numerator = torch.einsum("bnhd,bhde->bnhe", q, kv)
        denominator = torch.einsum("bnhd,bhd->bnh", q, k.mean(dim=1)) + 1e-6
        out = (numerator / denominator.unsqueeze(-1)).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return out + self.pe(x)


class ChannelsLastRecAttn(nn.Module):
    """RecAttn whose nearest 2x upsample-and-add is one broadcast add instead of an upsampled copy plus an add."""

    def __init__(self, rec_attn: RecAttn) -> None:
        super().__init__()
        self.down = rec_attn.down
        self.conv = rec_attn.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        b, c, h, w = x.shape
        if (h, w) != (2 * y.shape[2], 2 * y.shape[3]):
            # Odd sizes: nearest-neighbour indices are not i // 2, so keep the reference computation.
            return self.conv(x + F.interpolate(y, size=(h, w), mode="nearest"))
        # Nearest 2x upsampling repeats y[i // 2, j // 2]: add y to each 2x2 block of x by broadcasting.
        blocks = _nhwc(x).reshape(b, h // 2, 2, w // 2, 2, c) + _nhwc(y)[:, :, None, :, None, :]
        return self.conv(blocks.reshape(b, h, w, c).permute(0, 3, 1, 2))


def _replace(module: nn.Module, rewrite) -> nn.Module:
    """Children first, then `module` itself: `rewrite` returns a replacement or the module unchanged."""
    for name, child in module.named_children():
        setattr(module, name, _replace(child, rewrite))
    return rewrite(module)


def _channels_last_attention(module: nn.Module) -> nn.Module:
    if isinstance(module, LinearAttention):
        return ChannelsLastLinearAttention(module)
    if isinstance(module, RecAttn):
        return ChannelsLastRecAttn(module)
    return module


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
