"""CPU inference rewrites of mmdet's Mask R-CNN parts around the backbone: RoI feature extraction, FPN, RPN, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float, sampling_ratio: int,
              aligned: bool) -> torch.Tensor:
    """mmcv's average RoIAlign of `features` (n, c, h, w) at `rois` (r, 5: image index, x0, y0, x1, y1).

    The same samples and bilinear weights as mmcv's kernel, computed with tensors instead of a scalar loop, and
    summed by `embedding_bag` over rows of the channels-last features: each output value is one bag of
    (feature row, weight) pairs. mmcv's CPU kernel runs one roi, channel and sample at a time on one thread; this
    reads whole 256-channel rows with vector instructions on every thread. Results equal mmcv's up to float
    rounding (a few 1e-7 relative: the sums run in another order). Channels-last `features` are read in place.
    """
    pooled_h, pooled_w = output_size
    n, channels, height, width = features.shape
    rows = features.permute(0, 2, 3, 1).reshape(n * height * width, channels)
    out = features.new_empty(len(rois), pooled_h, pooled_w, channels)
    if len(rois) == 0:
        return out.permute(0, 3, 1, 2)
    offset = 0.5 if aligned else 0.0
    start = rois[:, 1:3] * spatial_scale - offset  # x0, y0
    size = rois[:, 3:5] * spatial_scale - offset - start
    if not aligned:
        size = size.clamp(min=1.0)
    if sampling_ratio > 0:
        grid = torch.full_like(size, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(size / size.new_tensor([pooled_w, pooled_h])).long()
    # Rois with the same sample grid make dense bags of one size: one batch of tensor operations per grid.
    keys = grid[:, 0] * (grid[:, 1].max() + 1) + grid[:, 1]
    for key in torch.unique(keys).tolist():
        members = torch.nonzero(keys == key).squeeze(1)
        grid_w, grid_h = grid[members[0]].tolist()
        if grid_w == 0 or grid_h == 0:
            # A roi of zero width or height has no samples: mmcv writes zeros.
            out[members] = 0
            continue
        y_index, y_weight = _axis_samples(start[members, 1], size[members, 1], pooled_h, grid_h, height)
        x_index, x_weight = _axis_samples(start[members, 0], size[members, 0], pooled_w, grid_w, width)
        image = rois[members, 0].long()[:, None, None, None, None, None, None]
        # (roi, ph, pw, iy, ix, corner y, corner x): every sample's four bilinear neighbours.
        y_index = y_index[:, :, None, :, None, :, None]
        x_index = x_index[:, None, :, None, :, None, :]
        index = ((image * height + y_index) * width + x_index).reshape(len(members) * pooled_h * pooled_w, -1)
        weight = (y_weight[:, :, None, :, None, :, None] * x_weight[:, None, :, None, :, None, :])
        weight = weight.reshape(index.shape)
        pooled = F.embedding_bag(index, rows, mode="sum", per_sample_weights=weight)
        # mmcv divides each sum by the number of samples, after summing.
        out[members] = (pooled / (grid_h * grid_w)).view(len(members), pooled_h, pooled_w, channels)
    return out.permute(0, 3, 1, 2)


def _axis_samples(start: torch.Tensor, length: torch.Tensor, bins: int, grid: int, limit: int):
    """Row (or column) indices and bilinear weights of the samples along one axis, as mmcv's kernel computes them.

    Returns (index, weight) of shape (rois, bins, grid, 2): the low and high neighbour of each sample. A sample
    more than one pixel outside the map weighs nothing; one within a pixel of the border is clamped to it.
    """
    bin_size = (length / bins)[:, None, None]
    bin_number = torch.arange(bins, dtype=start.dtype)[None, :, None]
    sample = (torch.arange(grid, dtype=start.dtype) + 0.5)[None, None, :]
    position = start[:, None, None] + bin_number * bin_size + sample * bin_size / grid
    outside = (position < -1.0) | (position > limit)
    position = position.clamp(min=0)
    low = position.long()
    at_edge = low >= limit - 1
    low = torch.where(at_edge, limit - 1, low)
    position = torch.where(at_edge, low.to(position.dtype), position)
    high = torch.where(at_edge, low, low + 1)
    fraction = position - low
    weight = torch.stack((1.0 - fraction, fraction), dim=-1).masked_fill(outside[..., None], 0.0)
    return torch.stack((low, high), dim=-1), weight


class ChannelsLastRoIExtractor(nn.Module):
    """mmdet's SingleRoIExtractor for inference, with `roi_align` in place of mmcv's RoIAlign layers.

    mmdet's forward also adds zero times the sum of every unused level's features to the output, so that all levels
    join the autograd graph of distributed training: whole passes over feature maps that inference does not need.
    """

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    @property
    def num_inputs(self) -> int:
        return self.extractor.num_inputs

    def forward(self, feats, rois: torch.Tensor, roi_scale_factor=None) -> torch.Tensor:
        extractor = self.extractor
        layers = extractor.roi_layers
        height, width = layers[0].output_size
        out = torch.empty(len(rois), extractor.out_channels, height, width, dtype=feats[0].dtype,
                          device=feats[0].device, memory_format=torch.channels_last)
        levels = extractor.map_roi_levels(rois, len(feats)) if len(feats) > 1 else rois.new_zeros(len(rois))
        if roi_scale_factor is not None:
            rois = extractor.roi_rescale(rois, roi_scale_factor)
        for level, (features, layer) in enumerate(zip(feats, layers)):
            members = torch.nonzero(levels == level).squeeze(1)
            if len(members):
                out[members] = roi_align(features, rois[members], layer.output_size, layer.spatial_scale,
                                         layer.sampling_ratio, layer.aligned)
        return out


def replaceable_roi_extractor(extractor: nn.Module) -> bool:
    """Whether `extractor` is an mmdet SingleRoIExtractor over mmcv average RoIAligns, which `roi_align` computes."""
    from mmcv.ops import RoIAlign
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    return type(extractor) is SingleRoIExtractor and all(
        type(layer) is RoIAlign and layer.pool_mode == "avg" and not layer.use_torchvision
        for layer in extractor.roi_layers
    )


def speed_up_roi_extractors(roi_head: nn.Module) -> bool:
    """Replace `roi_head`'s RoI extractors by ChannelsLastRoIExtractor; True when every one of them was replaced."""
    replaced = True
    for name in ("bbox_roi_extractor", "mask_roi_extractor"):
        extractor = getattr(roi_head, name, None)
        if extractor is None:
            continue
        if replaceable_roi_extractor(extractor):
            setattr(roi_head, name, ChannelsLastRoIExtractor(extractor))
        else:
            replaced = False
    return replaced


def speed_up_heads(detector: nn.Module) -> bool:
    """`detector`'s parts after the backbone rewritten for CPU inference (in place); True when the rewritten
    detector reads channels-last feature maps correctly."""
    roi_head = getattr(detector, "roi_head", None)
    return roi_head is not None and speed_up_roi_extractors(roi_head)
