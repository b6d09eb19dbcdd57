"""RecNeXt M/A backbones in plain PyTorch, laid out so released checkpoints load with strict=True."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from recnext_cli import zoo
from recnext_cli.variants import Variant

# Spatial reductions inside a RecConv before the last conv; stage 0 recurses deepest (spec: level = 4 - stage).
M_LEVELS = (4, 3, 2, 1)
TOKEN_KERNEL = 5


def _bn_scale_shift(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel affine map an eval-mode BatchNorm applies: y = x * scale + shift."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def fold_norm_after(conv: nn.Conv2d, norm: _BatchNorm) -> nn.Conv2d:
    """One Conv2d with bias equal to `norm(conv(x))` in eval mode (any kernel, any groups)."""
    scale, shift = _bn_scale_shift(norm)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return _conv_like(conv, conv.weight * scale[:, None, None, None], bias)


@torch.no_grad()
def fold_norm_before(norm: _BatchNorm, conv: nn.Conv2d) -> nn.Conv2d:
    """One Conv2d with bias equal to `conv(norm(x))` in eval mode.

    Exact only for a dense unpadded conv: with padding the border would see the norm's shift where the
    original saw zeros, so other convs are refused.
    """
    if conv.groups != 1 or any(p != 0 for p in conv.padding):
        raise ValueError("a BatchNorm folds into a following conv only when that conv is dense and unpadded")
    scale, shift = _bn_scale_shift(norm)
    bias = conv.weight.sum(dim=(2, 3)) @ shift
    if conv.bias is not None:
        bias = bias + conv.bias
    return _conv_like(conv, conv.weight * scale[None, :, None, None], bias)


def _fuse_tree(module: nn.Module) -> nn.Module:
    # Bottom-up, so a block's `_fold` sees children that are already plain convs.
    for name, child in module.named_children():
        setattr(module, name, _fuse_tree(child))
    fold = getattr(module, "_fold", None)
    return fold() if fold is not None else module


@torch.no_grad()
def fuse(module: nn.Module) -> nn.Module:
    """Fold every foldable BatchNorm (or SyncBatchNorm) of `module` into a neighbouring conv, for inference.

    Changes `module` in place and returns it (a new Conv2d when `module` itself is a ConvNorm), in eval mode;
    its outputs equal the unfused eval-mode module's up to float rounding.
    """
    return _fuse_tree(module).eval()


class ConvNorm(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; fuses into one Conv2d with bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def _fold(self) -> nn.Conv2d:
        return fold_norm_after(self.conv, self.norm)


def mlp(channels: int, hidden: int) -> nn.Sequential:
    """The channel mixer: 1x1 expand, GELU, 1x1 project back."""
    return nn.Sequential(ConvNorm(channels, hidden), nn.GELU(), ConvNorm(hidden, channels))


class Stem(nn.Module):
    """Two stride-2 3x3 ConvNorms: image to stride 4 with C0 channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvNorm(in_channels, out_channels // 2, 3, stride=2, padding=1),
            nn.GELU(),
            ConvNorm(out_channels // 2, out_channels, 3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


class Downsample(nn.Module):
    """Stride-2 depthwise 7x7 conv doubling the channels, BatchNorm, then a residual channel mixer."""

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        out_channels = 2 * in_channels
        self.token_mixer = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, groups=in_channels)
        self.norm = nn.BatchNorm2d(out_channels)
        self.channel_mixer = mlp(out_channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.token_mixer(x))
        return x + self.channel_mixer(x)

    def _fold(self) -> Downsample:
        if isinstance(self.norm, _BatchNorm):
            self.token_mixer = fold_norm_after(self.token_mixer, self.norm)
            self.norm = nn.Identity()
        return self


class RecConv(nn.Module):
    """Recursive depthwise convolution: one shared stride-2 conv builds a pyramid that is convolved coarse to fine."""

    def __init__(self, channels: int, level: int, kernel_size: int = TOKEN_KERNEL) -> None:
        super().__init__()
        self.level = level
        depthwise = dict(kernel_size=kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.down = nn.Conv2d(channels, channels, stride=2, **depthwise)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, **depthwise) for _ in range(level + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = []
        f = x
        for _ in range(self.level):
            size = f.shape[-2:]
            f = self.down(f)
            pyramid.append((f, size))
        acc = 0
        for conv, (f, size) in zip(self.convs, reversed(pyramid)):
            acc = F.interpolate(conv(f + acc), size=size, mode="bilinear")
        return self.convs[self.level](x + acc)


class MBlock(nn.Module):
    """M-series block: x + channel_mixer(norm(RecConv(x)))."""

    def __init__(self, channels: int, hidden: int, stage: int) -> None:
        super().__init__()
        self.token_mixer = RecConv(channels, level=M_LEVELS[stage])
        self.norm = nn.BatchNorm2d(channels)
        self.channel_mixer = mlp(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channel_mixer(self.norm(self.token_mixer(x)))

    def _fold(self) -> MBlock:
        if isinstance(self.norm, _BatchNorm):
            self.channel_mixer[0] = fold_norm_before(self.norm, self.channel_mixer[0])
            self.norm = nn.Identity()
        return self


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised linear attention in O(n·d²): q, k, v and the result are (..., d, n).

    out_i = q_iᵀ Σ_j (s·k_j)(s·v_j)ᵀ / (q_iᵀ mean_j k_j + eps) with s = n^-1/2.
    """
    s = q.shape[-1] ** -0.5
    q_t = q.transpose(-1, -2)
    kv = (k * s) @ (v * s).transpose(-1, -2)
    out = (q_t @ kv) / (q_t @ k.mean(dim=-1, keepdim=True) + eps)
    return out.transpose(-1, -2)


def quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The same attention as `linear_attention` through the explicit n×n score matrix (the published stage-3 form)."""
    s = q.shape[-1] ** -0.5
    scores = q.transpose(-1, -2) @ k
    scores = scores / (scores.mean(dim=-1, keepdim=True) + eps)
    return ((scores * s) @ (v * s).transpose(-1, -2)).transpose(-1, -2)


class LinearAttention(nn.Module):
    """Multi-head linear attention with elu+1 features over q, k from a grouped 1x1 conv, v = x, plus a conv position term."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qk = ConvNorm(channels, 2 * channels, groups=2)
        self.pe = ConvNorm(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        head_dim = c // self.heads
        qk = F.elu(self.qk(x)) + 1.0
        q, k = qk.reshape(b, 2, self.heads, head_dim, n).unbind(dim=1)
        v = x.reshape(b, self.heads, head_dim, n)
        return linear_attention(q, k, v).reshape(b, c, h, w) + self.pe(x)


class RecAttn(nn.Module):
    """Recursive attention: linear attention at half resolution, upsampled, added, then a depthwise ConvNorm."""

    def __init__(self, channels: int, heads: int, kernel_size: int = TOKEN_KERNEL) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.down = nn.Sequential(
            ConvNorm(channels, channels, kernel_size, stride=2, padding=pad, groups=channels),
            LinearAttention(channels, heads),
        )
        self.conv = ConvNorm(channels, channels, kernel_size, padding=pad, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + F.interpolate(self.down(x), size=x.shape[-2:], mode="nearest"))


class ABlock(nn.Module):
    """A-series block: x + channel_mixer(RecAttn(x)), with 2^(stage+1) heads."""

    def __init__(self, channels: int, hidden: int, stage: int) -> None:
        super().__init__()
        self.token_mixer = RecAttn(channels, heads=2 ** (stage + 1))
        self.channel_mixer = mlp(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channel_mixer(self.token_mixer(x))


BLOCKS = {"M": MBlock, "A": ABlock}


class Stage(nn.Module):
    """Optional downsample (identity in stage 0) followed by `depth` blocks."""

    def __init__(self, variant: Variant, index: int) -> None:
        super().__init__()
        channels = variant.widths[index]
        hidden = variant.hidden(channels)
        self.downsample = Downsample(variant.widths[index - 1], hidden) if index > 0 else nn.Identity()
        block = BLOCKS[variant.series]
        self.blocks = nn.Sequential(*(block(channels, hidden, index) for _ in range(variant.depths[index])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class RecNeXt(nn.Module):
    """The RecNeXt feature extractor: returns the four stage outputs at strides 4, 8, 16, 32."""

    def __init__(self, variant: str | Variant) -> None:
        super().__init__()
        # A name resolves through the zoo, so it accepts the zoo's spellings and refuses an unknown one its way.
        self.variant = variant if isinstance(variant, Variant) else zoo.get_model(variant).variant
        self.stem = Stem(3, self.variant.widths[0])
        self.stages = nn.Sequential(*(Stage(self.variant, i) for i in range(len(self.variant.widths))))

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.variant.widths

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def fuse(self) -> RecNeXt:
        """Fold all BatchNorms in place for inference; see `fuse`."""
        return fuse(self)


def build_recnext(variant: str) -> RecNeXt:
    """A randomly initialised RecNeXt backbone ("m3", "a5", …); reads no files."""
    return RecNeXt(variant)


@functools.lru_cache(maxsize=None)
def _state_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = RecNeXt(name)
    return tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())


def backbone_state_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of the backbone (no `backbone.` prefix) and its shape; built on the meta device."""
    return dict(_state_shapes(zoo.get_model(variant).name))
