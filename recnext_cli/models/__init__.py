"""mmdet 2.x integration: importing this package registers the RecNeXt backbones in mmdet's BACKBONES."""

from recnext_cli.models.backbone import PRETRAIN_CHECKPOINT_KEY, RESNET_STYLE_KEYS, RecNeXtBackbone
from recnext_cli.models.checkpoint import read_backbone_state
from recnext_cli.models.config import config_file, set_data_root, set_pretrain_checkpoint

__all__ = [
    "PRETRAIN_CHECKPOINT_KEY",
    "RESNET_STYLE_KEYS",
    "RecNeXtBackbone",
    "config_file",
    "read_backbone_state",
    "set_data_root",
    "set_pretrain_checkpoint",
]
