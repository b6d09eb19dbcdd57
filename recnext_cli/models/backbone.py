"""RecNeXt backbones registered in mmdet 2.x's BACKBONES as recnext_m0..m5 and recnext_a0..a5."""

from __future__ import annotations

import copy
import logging

from mmcv.runner import BaseModule
from mmcv.utils import print_log
from mmdet.models.builder import BACKBONES
from mmdet.utils import get_root_logger

from recnext_cli.errors import IntegrityError, UsageError
from recnext_cli.models.checkpoint import read_backbone_state
from recnext_cli.nn import RecNeXt, maybe_sync_bn
from recnext_cli.variants import VARIANTS

PRETRAIN_CHECKPOINT_KEY = "model.backbone.init_cfg.checkpoint"
# Keys the published configs inherit from mmdet's ResNet-50 base config. The published backbone swallows them
# unread; refusing them would break those configs, and honouring frozen_stages/norm_eval would change the recipe.
RESNET_STYLE_KEYS = frozenset(
    {"depth", "num_stages", "out_indices", "frozen_stages", "norm_cfg", "norm_eval", "style", "pretrained"}
)


class RecNeXtBackbone(RecNeXt, BaseModule):
    """The pure RecNeXt network as an mmcv BaseModule, so its state_dict keys sit directly under `backbone.`.

    `init_cfg=dict(type='Pretrained', checkpoint=PATH)` loads ImageNet weights in `init_weights`; `init_cfg=None`
    keeps the random initialisation. Construction applies the SyncBatchNorm policy (`maybe_sync_bn`).
    """

    def __init__(self, variant: str, init_cfg: dict | None = None, **resnet_style) -> None:
        unknown = sorted(set(resnet_style) - RESNET_STYLE_KEYS)
        if unknown:
            raise TypeError(f"recnext_{variant} got unexpected arguments {unknown}")
        super().__init__(variant)
        self.init_cfg = copy.deepcopy(init_cfg)
        # As in the published code the conversion follows construction: mmdet's train script initialises the
        # process group before building the model, and modules swapped later, inside init_weights, would escape
        # mmcv's parameter-init bookkeeping. Unlike the published code, single-process and CPU runs keep BatchNorm.
        maybe_sync_bn(self)

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if cfg is not None and cfg.get("type") == "Pretrained":
            self.load_pretrained(cfg.get("checkpoint"))
        elif cfg is not None:
            super().init_weights()

    def load_pretrained(self, checkpoint: str | None) -> None:
        """Load backbone weights from `checkpoint` non-strictly and log the keys that did not match."""
        name = f"recnext_{self.variant.name}"
        if not checkpoint:
            raise UsageError(
                f"{name}: init_cfg asks for pretrained weights but {PRETRAIN_CHECKPOINT_KEY} is not set; point it at "
                f"recnext_{self.variant.name}_distill_300e.pth, or set model.backbone.init_cfg=None to train from scratch."
            )
        state = read_backbone_state(checkpoint)
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches, e.g. another variant's weights
            raise IntegrityError(f"{checkpoint} does not fit {name}: {exc}") from exc
        logger = get_root_logger()
        print_log(f"{name}: loaded {len(state) - len(unexpected)} tensors from {checkpoint}", logger=logger)
        if missing:
            print_log(f"{name}: missing keys (left randomly initialised): {missing}", logger=logger, level=logging.WARNING)
        if unexpected:
            print_log(f"{name}: unexpected keys (ignored): {unexpected}", logger=logger)
        self._is_init = True


def _builder(variant: str):
    def build(init_cfg: dict | None = None, **resnet_style) -> RecNeXtBackbone:
        return RecNeXtBackbone(variant, init_cfg=init_cfg, **resnet_style)

    build.__name__ = build.__qualname__ = f"recnext_{variant}"
    build.__doc__ = f"RecNeXt-{variant.upper()} backbone for mmdet (see RecNeXtBackbone)."
    return build


for _variant in VARIANTS:
    BACKBONES.register_module(name=f"recnext_{_variant}", module=_builder(_variant))
