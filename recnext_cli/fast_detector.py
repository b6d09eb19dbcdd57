"""CPU inference rewrites of mmdet's Mask R-CNN heads: RoI feature extraction, mask upsampling and mask pasting."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from torch import nn

# Masks are pasted in batches of similar size, each grid_sample'd over the largest region in its batch: a batch may
# sample up to twice its masks' own area, plus this many pixels, so that small masks share one call.
PASTE_SLACK_PIXELS = 64 * 64


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


class InferenceFCNMaskHead(FCNMaskHead):
    """mmdet's FCNMaskHead (given this class in place of its own, weights untouched) with the same outputs, computed
    for CPU inference: the 2x2 stride-2 transposed convolution as one matrix product with its ReLU, and masks pasted
    into the image in a few batched grid_sample calls instead of one short call and a dozen small ops per mask.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(upsample_as_matmul(self.upsample, x).relu_())

    def get_seg_masks(self, mask_pred, det_bboxes, det_labels, rcnn_test_cfg, ori_shape, scale_factor, rescale):
        if not isinstance(mask_pred, torch.Tensor) or mask_pred.device.type != "cpu" or not len(mask_pred):
            return super().get_seg_masks(mask_pred, det_bboxes, det_labels, rcnn_test_cfg, ori_shape, scale_factor,
                                         rescale)
        # What mmdet 2.28's get_seg_masks does before pasting, in the same operations.
        mask_pred = mask_pred.sigmoid()
        bboxes = det_bboxes[:, :4]
        if not isinstance(scale_factor, torch.Tensor):
            if isinstance(scale_factor, float):
                scale_factor = np.array([scale_factor] * 4)
            scale_factor = torch.Tensor(scale_factor)
        if rescale:
            img_h, img_w = ori_shape[:2]
            bboxes = bboxes / scale_factor.to(bboxes)
        else:
            w_scale, h_scale = scale_factor[0], scale_factor[1]
            img_h = int(np.round(ori_shape[0] * h_scale.item()).astype(np.int32))
            img_w = int(np.round(ori_shape[1] * w_scale.item()).astype(np.int32))
        count = len(mask_pred)
        if not self.class_agnostic:
            mask_pred = mask_pred[range(count), det_labels][:, None]
        masks = paste_masks(mask_pred, bboxes, img_h, img_w, rcnn_test_cfg.mask_thr_binary)
        segms = [[] for _ in range(self.num_classes)]
        for mask, label in zip(masks, det_labels.tolist()):
            segms[label].append(mask)
        return segms


def upsample_as_matmul(deconv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """`deconv(x)` for a transposed convolution whose kernel equals its stride: every output pixel is one input
    pixel times one kernel tap, so the whole layer is one (pixels x in) @ (in x taps*out) product and a reshuffle.
    Returns a channels-last tensor."""
    batch, channels, height, width = x.shape
    kernel_h, kernel_w = deconv.kernel_size
    out_channels = deconv.out_channels
    weight = deconv.weight.permute(0, 2, 3, 1).reshape(channels, kernel_h * kernel_w * out_channels)
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
    if deconv.bias is None:
        y = rows @ weight
    else:
        y = torch.addmm(deconv.bias.repeat(kernel_h * kernel_w), rows, weight)
    y = y.view(batch, height, width, kernel_h, kernel_w, out_channels).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(batch, height * kernel_h, width * kernel_w, out_channels).permute(0, 3, 1, 2)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int, threshold: float) -> np.ndarray:
    """Masks (n, 1, h, w) of probabilities pasted into boxes (n, 4) of an img_h x img_w image: (n, img_h, img_w),
    bool above `threshold`, or uint8 probabilities x 255 for a negative threshold, as mmdet's CPU paste gives them.

    mmdet samples each mask with grid_sample over its box's pixels plus one on each side; this computes the same
    grids with the same operations, but for a batch of masks at once, padded to the batch's largest region. Each
    pixel is computed exactly as in mmdet (the padding is sampled too, then dropped).
    """
    count = len(masks)
    x0_int = torch.clamp(boxes[:, 0].floor() - 1, min=0).to(dtype=torch.int32)
    y0_int = torch.clamp(boxes[:, 1].floor() - 1, min=0).to(dtype=torch.int32)
    x1_int = torch.clamp(boxes[:, 2].ceil() + 1, max=img_w).to(dtype=torch.int32)
    y1_int = torch.clamp(boxes[:, 3].ceil() + 1, max=img_h).to(dtype=torch.int32)
    widths = (x1_int - x0_int).clamp(min=0).tolist()
    heights = (y1_int - y0_int).clamp(min=0).tolist()
    out = np.zeros((count, img_h, img_w), dtype=bool if threshold >= 0 else np.uint8)
    for batch in _paste_batches(heights, widths):
        index = torch.tensor(batch)
        height, width = max(heights[i] for i in batch), max(widths[i] for i in batch)
        if not height or not width:
            continue
        x0, y0, x1, y1 = torch.split(boxes[index], 1, dim=1)
        img_y = (torch.arange(height, dtype=torch.int32) + y0_int[index, None]).to(torch.float32) + 0.5
        img_x = (torch.arange(width, dtype=torch.int32) + x0_int[index, None]).to(torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        img_x = img_x.masked_fill(torch.isinf(img_x), 0)
        img_y = img_y.masked_fill(torch.isinf(img_y), 0)
        grid = torch.stack([img_x[:, None, :].expand(-1, height, -1), img_y[:, :, None].expand(-1, -1, width)], 3)
        pasted = F.grid_sample(masks[index].to(dtype=torch.float32), grid, align_corners=False)[:, 0]
        pasted = (pasted >= threshold) if threshold >= 0 else (pasted * 255).to(dtype=torch.uint8)
        pasted = pasted.numpy()
        for row, i in enumerate(batch):
            top, left = int(y0_int[i]), int(x0_int[i])
            out[i, top:top + heights[i], left:left + widths[i]] = pasted[row, :heights[i], :widths[i]]
    return out


def _paste_batches(heights: list[int], widths: list[int]) -> list[list[int]]:
    """Mask indices grouped by region size, so that padding each group to its largest region costs little."""
    batches, batch, batch_h, batch_w, area = [], [], 0, 0, 0
    for i in sorted(range(len(heights)), key=lambda i: (heights[i], widths[i])):
        grown_h, grown_w = max(batch_h, heights[i]), max(batch_w, widths[i])
        own = area + heights[i] * widths[i]
        if batch and (len(batch) + 1) * grown_h * grown_w > 2 * own + PASTE_SLACK_PIXELS:
            batches.append(batch)
            batch, grown_h, grown_w, own = [], heights[i], widths[i], heights[i] * widths[i]
        batch.append(i)
        batch_h, batch_w, area = grown_h, grown_w, own
    if batch:
        batches.append(batch)
    return batches


def speed_up_mask_head(roi_head: nn.Module) -> None:
    """Give `roi_head`'s mask head InferenceFCNMaskHead's forward and paste, where it is a plain FCNMaskHead whose
    upsampling is a transposed convolution with kernel = stride."""
    head = getattr(roi_head, "mask_head", None)
    if type(head) is not FCNMaskHead or head.upsample_method != "deconv":
        return
    deconv = head.upsample
    plain = (deconv.padding, deconv.output_padding, deconv.dilation, deconv.groups) == ((0, 0), (0, 0), (1, 1), 1)
    # mmcv's own ConvTranspose2d subclass only adds support for empty batches, which the matrix product has too.
    if isinstance(deconv, nn.ConvTranspose2d) and deconv.kernel_size == deconv.stride and plain:
        head.__class__ = InferenceFCNMaskHead


def speed_up_heads(detector: nn.Module) -> bool:
    """`detector`'s parts after the backbone rewritten for CPU inference (in place); True when the rewritten
    detector reads channels-last feature maps correctly."""
    roi_head = getattr(detector, "roi_head", None)
    if roi_head is None:
        return False
    speed_up_mask_head(roi_head)
    return speed_up_roi_extractors(roi_head)
