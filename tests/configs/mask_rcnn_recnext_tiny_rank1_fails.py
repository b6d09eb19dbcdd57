"""The tiny test config, with rank 1 crashing after two iterations (tests/configs must be on PYTHONPATH)."""

_base_ = ['../../recnext_cli/configs/demo/mask_rcnn_recnext_m0_shapes.py']
custom_imports = dict(imports=['recnext_cli.models', 'failing_rank'], allow_failed_imports=False)
custom_hooks = [dict(type='FailOnRank', rank=1, after_iters=2)]
