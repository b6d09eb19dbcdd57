"""The module rewrites: oneDNN convolutions with GELU / residual adds fused in, and attention computed channels-last."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recnext_cli.nn import ABlock, Downsample, LinearAttention, MBlock, RecAttn, Stem


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
