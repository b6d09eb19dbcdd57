"""The inference fast path: a RecNeXt model rewritten for latency with outputs equal to the eager fp32 model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recnext_cli.errors import EnvironmentProblem, UsageError
from recnext_cli.nn import LinearAttention, RecAttn, fuse

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    if not _onednn_runs(dtype):
        # Without oneDNN support the convolutions fall back to scalar reference kernels, and their timings mean nothing.
        alternative = " or bf16" if dtype is torch.float16 and _onednn_runs(torch.bfloat16) else ""
        raise UsageError(
            f"--dtype {name} on this CPU has no fast convolution kernels (oneDNN needs AVX512-FP16 or AVX-NE-CONVERT "
            f"for fp16, AVX512 for bf16); use --dtype fp32{alternative}"
        )
    return dtype


def _onednn_runs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    probe = torch.ones(1, 1, 1, 1, dtype=dtype)
    try:
        torch.mkldnn_convolution(probe, probe, None, [0, 0], [1, 1], [1, 1], 1)
    except RuntimeError:
        return False
    return True


class OneDnnPointwiseConv(nn.Module):
    """A 1x1 Conv2d that always runs on oneDNN.

    PyTorch (2.14) sends 1x1 convolutions of small batches to its THNN im2col+GEMM path when it runs single-threaded
    ("THNN is faster when single-threaded" in aten's Convolution.cpp); on AVX-512 CPUs oneDNN is about twice as fast.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(x, self.weight, self.bias, [0, 0], [1, 1], [1, 1], self.groups)


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


def _pointwise_on_onednn(module: nn.Module) -> nn.Module:
    pointwise = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
    if pointwise and module.stride == (1, 1) and module.padding == (0, 0):
        return OneDnnPointwiseConv(module)
    return module


def _channels_last_attention(module: nn.Module) -> nn.Module:
    if isinstance(module, LinearAttention):
        return ChannelsLastLinearAttention(module)
    if isinstance(module, RecAttn):
        return ChannelsLastRecAttn(module)
    return module


@torch.no_grad()
def prepare_for_inference(
    model: nn.Module,
    *,
    fused: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """`model` (changed in place, also returned) in eval mode on `device` in `dtype`, rewritten for inference.

    - fused: BatchNorms folded into convolutions (`recnext_cli.nn.fuse`); on a CPU with oneDNN and without compile,
      1x1 convolutions also run on oneDNN where PyTorch would pick its slower THNN kernel.
    - channels_last: weights in NHWC memory format, and A-series attention computed token-major so that NHWC
      activations flow through without layout copies. Feed NHWC inputs (`prepare_input`) to get the benefit.
    - compile: `torch.compile` — on CUDA with CUDA graphs (mode "reduce-overhead", so each call's outputs are
      overwritten by the next call), on CPU with inductor's weight freezing (`FrozenCompiled`; call it with gradients
      off). The first call compiles (minutes on a small CPU).
    - dtype: fp16/bf16 cast the whole model; outputs then differ from fp32 by the type's rounding.
    With fp32 and any combination of the flags, outputs equal the eager unfused model's within 1e-4 relative.
    """
    device = torch.device(device)
    model.eval()
    if fused:
        model = fuse(model)
        # Compiled models get their oneDNN kernels from inductor, which cannot trace mkldnn_convolution.
        if device.type == "cpu" and not compile and torch.backends.mkldnn.is_available():
            model = _replace(model, _pointwise_on_onednn)
    if channels_last:
        model = _replace(model, _channels_last_attention)
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
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
    *,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """`x` on `device` in `dtype`, in the memory format a model prepared with the same settings runs fastest on."""
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class NchwFeatures(nn.Module):
    """A prepared backbone whose feature maps leave in NCHW memory order.

    mmcv 1.7's CPU RoIAlign indexes its input's data pointer as contiguous NCHW without checking, so channels-last
    features reaching it through FPN would be read wrongly.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [feature.contiguous() for feature in self.backbone(x)]
