"""Mask R-CNN + FPN with the RecNeXt-M4 (recursive-convolution) backbone, 1x schedule on COCO: the published recipe."""

_base_ = [
    '_base_/models/mask_rcnn_recnext_fpn.py',
    '_base_/datasets/coco_instance.py',
    '_base_/schedules/schedule_adamw_1x.py',
    '_base_/default_runtime.py',
]
model = dict(
    backbone=dict(type='recnext_m4'),
    neck=dict(in_channels=[64, 128, 256, 512]))
