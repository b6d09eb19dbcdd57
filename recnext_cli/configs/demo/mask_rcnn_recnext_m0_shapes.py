"""RecNeXt-M0 Mask R-CNN shrunk for CPU: 128x128 images of the synthetic shapes set, narrow heads (demo and tests)."""

_base_ = [
    '../_base_/models/mask_rcnn_recnext_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/default_runtime.py',
]

classes = ('rectangle', 'ellipse', 'triangle')
width = 64
# The published model with narrower heads, fewer samples and proposals, and anchors sized for 128x128 images.
model = dict(
    # Trained from scratch: the tests have no ImageNet weights to start from.
    backbone=dict(type='recnext_m0', init_cfg=None),
    neck=dict(in_channels=[40, 80, 160, 320], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width, anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=256, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(num_convs=2, in_channels=width, conv_out_channels=width, num_classes=len(classes))),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', img_scale=(128, 128), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='Pad', size_divisor=32),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels', 'gt_masks']),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(128, 128),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img']),
        ]),
]
# Data loading in the worker process itself: CI has two cores, both busy with the two workers.
data = dict(
    samples_per_gpu=2,
    workers_per_gpu=0,
    train=dict(classes=classes, pipeline=train_pipeline),
    val=dict(classes=classes, pipeline=test_pipeline),
    test=dict(classes=classes, pipeline=test_pipeline))
evaluation = dict(interval=1000, metric=['bbox', 'segm'])

# The batch this lr was tuned for (2 workers x 2 images): `recnext train` keeps it per optimizer step.
auto_scale_lr = dict(enable=False, base_batch_size=4)
optimizer = dict(type='AdamW', lr=0.001, weight_decay=0.05)
optimizer_config = dict(grad_clip=dict(max_norm=10.0))
lr_config = dict(policy='step', warmup='linear', warmup_iters=10, warmup_ratio=0.01, step=[1000])
runner = dict(type='EpochBasedRunner', max_epochs=2)
checkpoint_config = dict(interval=1)
log_config = dict(interval=5, hooks=[dict(type='TextLoggerHook')])
