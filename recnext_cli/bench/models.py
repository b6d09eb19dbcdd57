"""The models `recnext bench latency` times: seeded random backbones and detectors, prepared on a random input."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from recnext_cli import zoo
from recnext_cli.bench.config import BenchConfig, check_config
from recnext_cli.errors import EnvironmentProblem


@dataclasses.dataclass(frozen=True)
class Runner:
    """A prepared model on its input: `run()` is one timed call."""

    run: Callable[[], Any]
    params: int  # of the model as published (BatchNorms unfolded)
    flops: int
    fast_path: Any  # recnext_cli.fastpath.FastPath
    device: Any  # torch.device


def random_backbone(name: str, seed: int = 0):
    """Backbone `name` in eval mode with seeded random weights and BatchNorm statistics away from the identity.

    A freshly built BatchNorm is the identity map in eval mode; a trained one is not, and folding it then changes
    every weight. Equality checks of the fast path need the second kind.
    """
    import torch
    from torch import nn

    from recnext_cli.nn import build_recnext

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_recnext(name)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def count_parameters(model) -> int:
    """The number of parameter elements (BatchNorm running statistics are buffers, not parameters)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as `torch.utils.flop_counter.FlopCounterMode` counts them.

    That is 2 x multiply-adds of convolutions and matrix products (attention included); element-wise ops, pooling,
    interpolation and NMS count as zero.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build_runner(name: str, config: BenchConfig, *, with_flops: bool = True) -> Runner:
    """Model `name` with random seeded weights, prepared as `config` says, on a seeded random input.

    `with_flops=False` skips counting FLOPs (one more forward pass, slow under the counter; `Runner.flops` is 0).
    """
    import torch

    from recnext_cli.fastpath import choose_fast_path, resolve_device, resolve_dtype

    check_config(config)
    entry = zoo.get_model(name)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    plan = choose_fast_path(device, dtype, fused=config.fused, compile=config.compile)
    if config.part != "detector":
        plan = dataclasses.replace(plan, detector_heads=False)  # a backbone has no heads to rewrite
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(config.batch, 3, *config.input_size, generator=generator)
    build = _detector_runner if config.part == "detector" else _backbone_runner
    run, params, flops = build(entry.name, images, config, plan, device, dtype, with_flops)
    return Runner(run, params, flops, plan, device)


def _backbone_runner(name, images, config: BenchConfig, plan, device, dtype, with_flops: bool):
    import torch

    from recnext_cli.fastpath import prepare_for_inference, prepare_input

    model = random_backbone(name)
    params = count_parameters(model)
    with torch.inference_mode():
        flops = count_flops(lambda: model(images)) if with_flops else 0
    model = prepare_for_inference(model, plan, dtype=dtype, device=device)
    inputs = prepare_input(images, plan, dtype=dtype, device=device)
    return (lambda: model(inputs)), params, flops


def _detector_runner(name, images, config: BenchConfig, plan, device, dtype, with_flops: bool):
    """Mask R-CNN built from the published config with random weights, timed through mmdet's test-mode forward.

    fp16 is mmdet's own fp16 mode (`wrap_fp16_model`: autocast in the network, fp32 box decoding and NMS).
    """
    import torch

    from recnext_cli.fastpath import prepare_input, speed_up_detector

    detector = build_random_detector(name)
    params = count_parameters(detector)
    metas = detector_metas(config.input_size, config.batch)

    def forward(x):
        return detector(return_loss=False, rescale=False, img=[x], img_metas=[metas])

    with torch.inference_mode():
        flops = count_flops(lambda: forward(images)) if with_flops else 0
    detector = speed_up_detector(detector, plan, dtype=dtype, device=device)
    if dtype is torch.float16:
        from mmcv.runner import wrap_fp16_model

        wrap_fp16_model(detector)
    inputs = prepare_input(images, plan, dtype=dtype, device=device)
    return (lambda: forward(inputs)), params, flops


def detector_metas(input_size: tuple[int, int], batch: int) -> list[dict]:
    """mmdet image metas for `batch` unscaled, unflipped images of `input_size` (height, width), already padded."""
    import numpy as np

    height, width = input_size
    meta = {
        "ori_shape": (height, width, 3),
        "img_shape": (height, width, 3),
        "pad_shape": (height, width, 3),
        "scale_factor": np.ones(4, dtype=np.float32),
        "flip": False,
        "flip_direction": None,
    }
    return [dict(meta) for _ in range(batch)]


def build_random_detector(name: str):
    """Model `name`'s Mask R-CNN from its published config, in eval mode, with seeded random weights."""
    import torch

    try:
        from recnext_cli import compat

        compat.apply_all()
        from mmcv import Config
        from mmdet.models import build_detector

        # Importing recnext_cli.models also registers the RecNeXt backbones with mmdet.
        from recnext_cli.models import config_file
        from recnext_cli.models.config import for_inference
    except ImportError as exc:
        raise EnvironmentProblem(
            f"--part detector needs mmcv-full and mmdet ({exc}); run `recnext setup`, or time --part backbone"
        ) from None

    cfg = Config.fromfile(str(config_file(name)))
    # Random weights (torch's default initialisation; mmcv's init_weights would log every tensor), so that no
    # checkpoint is needed. How many boxes reach the mask head depends on them, so they are seeded: the same model
    # gets the same weights, and the same head load, in every run.
    for_inference(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        detector = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
    return busy_heads(detector).eval()


def busy_heads(detector):
    """`detector` (changed in place, also returned) with its random RoI heads as decided as trained ones.

    Freshly initialised, the box classifier's logits are nearly equal (standard deviation 0.05): every class
    scores about 1/81, under the 0.05 score threshold, so no box would reach the mask head or the mask paste, and
    a timing would leave out a third of a real inference. Scaled up 40 times, with the background logit lowered,
    each proposal names a few classes, and the test keeps `max_per_img` (100) detections as on a busy COCO image.
    The mask logits are scaled 30 times, to a trained head's confidence (2% of pixels within 0.01 of the 0.5
    threshold), so that equal masks mean equal computations rather than luck at the threshold.
    """
    import torch

    roi_head = detector.roi_head
    with torch.no_grad():
        roi_head.bbox_head.fc_cls.weight.mul_(40.0)
        roi_head.bbox_head.fc_cls.bias[-1] = -10.0
        if getattr(roi_head, "mask_head", None) is not None:
            roi_head.mask_head.conv_logits.weight.mul_(30.0)
    return detector
