"""12 epochs of AdamW (lr 2e-4, weight decay 0.05), linear warm-up over 500 iterations, lr x0.1 after epochs 8 and 11."""

optimizer = dict(type='AdamW', lr=0.0002, weight_decay=0.05)
optimizer_config = dict(grad_clip=None)
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=1e-06, step=[8, 11])
runner = dict(type='EpochBasedRunner', max_epochs=12)
