"""Where the six published Mask R-CNN configs live, the settings a launcher fills in, and the inference-time edits."""

from __future__ import annotations

from pathlib import Path

from recnext_cli import zoo
from recnext_cli.errors import UnknownModelError

DATA_SPLITS = ("train", "val", "test")


def config_file(variant: str) -> Path:
    """The mmdet config of a COCO model, named in any spelling the zoo accepts ("m3", "recnext_m3")."""
    model = zoo.get_model(variant)
    if model.coco is None:
        # For the mmdet-side API a classification-only size is not a model it knows (zoo.config_path calls it misuse).
        raise UnknownModelError(
            f"{model.title} has no COCO config; choose one of {', '.join(zoo.DETECTION_MODELS)}."
        )
    return zoo.config_path(model.name)


def set_data_root(cfg, data_root: str | Path) -> None:
    """Point `cfg` (an mmcv Config) at another COCO directory.

    The dataset paths were joined with `data_root` when the config was parsed, so each one that starts with
    the old root is rewritten too.
    """
    old = cfg.data_root
    new = str(data_root).rstrip("/") + "/"
    cfg.data_root = new
    for split in DATA_SPLITS:
        dataset = cfg.data[split]
        for key in ("ann_file", "img_prefix"):
            if dataset.get(key, "").startswith(old):
                dataset[key] = new + dataset[key][len(old) :]


def set_pretrain_checkpoint(cfg, checkpoint: str | Path | None) -> None:
    """Fill `model.backbone.init_cfg.checkpoint`; None drops the pretrained init (training from scratch)."""
    init_cfg = None if checkpoint is None else dict(type="Pretrained", checkpoint=str(checkpoint))
    cfg.merge_from_dict({"model.backbone.init_cfg": init_cfg})


def for_inference(cfg) -> None:
    """Ready `cfg` (an mmcv Config) for building a detector that weights are then loaded into.

    Every weight comes from a checkpoint (or stays random in a benchmark), so an ImageNet pretrain the config names
    would only be loaded and overwritten, and training settings have no use.
    """
    cfg.model.pretrained = None
    if "init_cfg" in cfg.model.backbone:
        cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg = None
