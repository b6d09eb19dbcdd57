"""CPU inference rewrites of mmdet's Mask R-CNN parts around the backbone: RoI feature extraction, FPN, RPN, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def roi_align(feature_maps, rois: torch.Tensor, output_size, spatial_scales, sampling_ratio: int, aligned: bool,
              levels: torch.Tensor | None = None) -> torch.Tensor:
    """mmcv's average RoIAlign of each roi (r, 5: image index, x0, y0, x1, y1) on the map its level names.

    `feature_maps[i]` (n, c, h_i, w_i) has the scale `spatial_scales[i]`; `levels` (default: all 0) picks a map per
    roi. The same samples and bilinear weights as mmcv's kernel, computed with tensors instead of a scalar loop, and
    summed by `embedding_bag` over rows of the channels-last maps: each output value is one bag of (feature row,
    weight) pairs. mmcv's CPU kernel runs one roi, channel and sample at a time on one thread; this reads whole
    channel rows with vector instructions on every thread, and takes a fixed number of tensor operations whatever
    the number of rois and levels. Results equal mmcv's up to float rounding (about 1e-6 relative: the sums run in
    another order). Channels-last maps are read in place. Returns (r, c, *output_size), channels-last.
    """
    pooled_h, pooled_w = output_size
    bins = pooled_h * pooled_w
    first = feature_maps[0]
    out = torch.empty(len(rois), first.shape[1], pooled_h, pooled_w, dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last)
    if len(rois) == 0:
        return out
    if levels is None:
        levels = torch.zeros(len(rois), dtype=torch.long, device=rois.device)
    # Sorted by level, each map's bags are one contiguous run: one embedding_bag call per map.
    order = torch.argsort(levels, stable=True)
    rois, levels = rois[order], levels[order]
    map_sizes = torch.tensor([feature_map.shape[2:] for feature_map in feature_maps], device=rois.device)
    height, width = map_sizes[levels, 0], map_sizes[levels, 1]
    scale = torch.tensor(spatial_scales, dtype=rois.dtype, device=rois.device)[levels, None]
    offset = 0.5 if aligned else 0.0
    start = rois[:, 1:3] * scale - offset  # x0, y0
    size = rois[:, 3:5] * scale - offset - start
    if not aligned:
        size = size.clamp(min=1.0)
    if sampling_ratio > 0:
        grid = torch.full_like(size, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(size / size.new_tensor([pooled_w, pooled_h])).long()
    grid_w, grid_h = grid.unbind(dim=1)
    # int32 indices: half the memory traffic of int64, and embedding_bag takes them (the maps stay far below 2**31).
    rows_before = ((rois[:, 0].long() * height) * width).int()
    y_offset, y_weight, y_first = _axis_samples(start[:, 1], size[:, 1], pooled_h, grid_h, height)
    y_offset = (y_offset * torch.repeat_interleave(width.int(), 2 * pooled_h * grid_h)
                + torch.repeat_interleave(rows_before, 2 * pooled_h * grid_h))
    x_index, x_weight, x_first = _axis_samples(start[:, 0], size[:, 0], pooled_w, grid_w, width)

    # Each bag (roi, bin y, bin x) holds its y taps (2 per sample: the low and high neighbour) times its x taps. Built
    # in two expansions, bag -> (bag, y tap) -> (bag, y tap, x tap), so that no per-entry division is needed.
    y_taps, x_taps = (2 * grid_h).int(), (2 * grid_w).int()
    bin_y = torch.arange(pooled_h, dtype=torch.int32, device=rois.device).repeat_interleave(pooled_w).repeat(len(rois))
    bin_x = torch.arange(pooled_w, dtype=torch.int32, device=rois.device).repeat(len(rois) * pooled_h)
    bag_y_taps = torch.repeat_interleave(y_taps, bins)
    bag_x_taps = torch.repeat_interleave(x_taps, bins)
    bag_y_first = torch.repeat_interleave(y_first, bins) + bin_y * bag_y_taps
    bag_x_first = torch.repeat_interleave(x_first, bins) + bin_x * bag_x_taps
    line = torch.repeat_interleave(torch.arange(len(bag_y_taps), device=rois.device), bag_y_taps)
    line_y = _take(bag_y_first, line) + _ranks(bag_y_taps, line)
    line_x_taps = _take(bag_x_taps, line)
    entry_line = torch.repeat_interleave(torch.arange(len(line), device=rois.device), line_x_taps)
    entry_x = _take(_take(bag_x_first, line), entry_line) + _ranks(line_x_taps, entry_line)
    index = _take(_take(y_offset, line_y), entry_line) + _take(x_index, entry_x)
    weight = _take(_take(y_weight, line_y), entry_line) * _take(x_weight, entry_x)
    bag_sizes = bag_y_taps * bag_x_taps
    bag_starts = torch.cumsum(bag_sizes, 0, dtype=torch.int32) - bag_sizes

    pooled = out.new_empty(len(rois), bins, out.shape[1])
    roi_ends = torch.cumsum(torch.bincount(levels, minlength=len(feature_maps)), 0).tolist()
    first_roi = 0
    for feature_map, last_roi in zip(feature_maps, roi_ends):
        if last_roi > first_roi:
            rows = feature_map.permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1])
            bag_range = slice(first_roi * bins, last_roi * bins)
            first_entry = int(bag_starts[bag_range.start])
            last_entry = int(bag_starts[bag_range.stop - 1] + bag_sizes[bag_range.stop - 1])
            pooled[first_roi:last_roi] = F.embedding_bag(
                index[first_entry:last_entry], rows, bag_starts[bag_range] - first_entry, mode="sum",
                per_sample_weights=weight[first_entry:last_entry],
            ).view(last_roi - first_roi, bins, -1)
        first_roi = last_roi
    # mmcv divides each sum by the number of samples, after summing.
    pooled /= (grid_h * grid_w).clamp(min=1).to(pooled.dtype)[:, None, None]
    out.permute(0, 2, 3, 1).view(len(rois), bins, -1)[order] = pooled
    return out


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] for 1-d tensors: index_select takes int32 indices as they are, where indexing converts them."""
    return values.index_select(0, index)


def _ranks(counts: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """For items listed group after group (`group[i]`: item i's group, groups of `counts` items), each item's rank
    within its group."""
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return torch.arange(len(group), dtype=torch.int32, device=group.device) - _take(starts, group)


def _axis_samples(start: torch.Tensor, length: torch.Tensor, bins: int, grid: torch.Tensor, limit: torch.Tensor):
    """Indices and bilinear weights of every roi's samples along one axis, as mmcv's kernel computes them.

    Roi i has `bins` bins of `grid[i]` samples, each with a low and a high neighbour: flat (index, weight) tensors,
    ordered roi, bin, sample, neighbour, and where each roi's entries begin. A sample more than one pixel outside
    the map weighs nothing; one within a pixel of the border is clamped to it.
    """
    samples = bins * grid
    roi = torch.repeat_interleave(torch.arange(len(start), device=start.device), samples)
    rest = _ranks(samples.int(), roi)
    roi_grid = _take(grid, roi)
    bin_number, sample = rest // roi_grid, rest % roi_grid
    bin_size = _take(length / bins, roi)
    # mmcv's order of operations, so that positions agree to the last bit.
    position = _take(start, roi) + bin_number * bin_size + (sample + 0.5) * bin_size / roi_grid
    roi_limit = _take(limit, roi)
    outside = (position < -1.0) | (position > roi_limit)
    position = position.clamp(min=0)
    low = position.long()
    at_edge = low >= roi_limit - 1
    low = torch.where(at_edge, roi_limit - 1, low)
    position = torch.where(at_edge, low.to(position.dtype), position)
    high = torch.where(at_edge, low, low + 1)
    fraction = position - low
    weight = torch.stack((1.0 - fraction, fraction), dim=-1).masked_fill(outside[:, None], 0.0)
    first = 2 * (torch.cumsum(samples, 0) - samples)
    return torch.stack((low, high), dim=-1).view(-1).int(), weight.view(-1), first.int()


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
        layer = extractor.roi_layers[0]
        levels = extractor.map_roi_levels(rois, len(feats)) if len(feats) > 1 else None
        if roi_scale_factor is not None:
            rois = extractor.roi_rescale(rois, roi_scale_factor)
        scales = [roi_layer.spatial_scale for roi_layer in extractor.roi_layers[:len(feats)]]
        return roi_align(feats, rois, layer.output_size, scales, layer.sampling_ratio, layer.aligned, levels)


def replaceable_roi_extractor(extractor: nn.Module) -> bool:
    """Whether `extractor` is an mmdet SingleRoIExtractor over mmcv average RoIAligns, which `roi_align` computes."""
    from mmcv.ops import RoIAlign
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    layers = extractor.roi_layers if type(extractor) is SingleRoIExtractor else ()
    # One output size, sampling ratio and alignment for all levels (what mmdet's single roi_layer config builds).
    settings = {(layer.output_size, layer.sampling_ratio, layer.aligned) for layer in layers}
    return len(settings) == 1 and all(
        type(layer) is RoIAlign and layer.pool_mode == "avg" and not layer.use_torchvision for layer in layers
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
