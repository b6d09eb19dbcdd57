"""The six Mask R-CNN configs: they load, match the published run configs, and take the launcher's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

mmcv = pytest.importorskip("mmcv", reason="mmcv-full is not installed; run `recnext setup`")
pytest.importorskip("mmdet", reason="mmdet is not installed; run `recnext setup`")

from recnext_cli.errors import UnknownModelError  # noqa: E402
from recnext_cli.models import config_file, set_data_root, set_pretrain_checkpoint  # noqa: E402

COCO = ("m3", "m4", "m5", "a3", "a4", "a5")
# Each published run's logged config text, kept by tests/data/published/extract.py.
PUBLISHED = Path(__file__).resolve().parent / "data" / "published"
# Written into the dumped config by mmdet's train script, not part of the recipe.
RUNTIME_ONLY = {"work_dir", "auto_resume", "gpu_ids"}
# Ours only: makes mmdet's own tools register the RecNeXt backbones when they load the config.
OURS_ONLY = {"custom_imports"}
COMPARED = (
    "optimizer",
    "optimizer_config",
    "lr_config",
    "runner",
    "data",
    "train_pipeline",
    "test_pipeline",
    "img_norm_cfg",
    "dataset_type",
    "data_root",
    "evaluation",
    "checkpoint_config",
    "log_config",
    "custom_hooks",
    "dist_params",
    "log_level",
    "load_from",
    "resume_from",
    "workflow",
)


def ours(variant: str) -> dict:
    return mmcv.Config.fromfile(str(config_file(variant)))._cfg_dict.to_dict()


def published(variant: str) -> dict:
    text = (PUBLISHED / f"recnext_{variant}_coco.py").read_text(encoding="utf-8")
    return mmcv.Config.fromstring(text, ".py")._cfg_dict.to_dict()


def _without_checkpoint_source(model: dict) -> dict:
    """The model minus what legitimately differs: where pretrained weights come from."""
    model.pop("pretrained", None)
    backbone = model["backbone"]
    backbone.pop("pretrained", None)
    backbone["init_cfg"].pop("checkpoint")
    return model


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'published' if key in a else 'ours'}")
            else:
                out += _differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and type(a) is type(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{path}: published {a!r}, ours {b!r}"]


@pytest.mark.parametrize("variant", COCO)
def test_model_matches_published(variant):
    theirs, mine = published(variant), ours(variant)
    assert mine["model"]["backbone"]["type"] == f"recnext_{variant}"
    assert _differences(_without_checkpoint_source(theirs["model"]), _without_checkpoint_source(mine["model"])) == []


@pytest.mark.parametrize("variant", COCO)
def test_training_recipe_and_data_match_published(variant):
    theirs, mine = published(variant), ours(variant)
    assert _differences({k: theirs[k] for k in COMPARED}, {k: mine[k] for k in COMPARED}) == []
    assert mine["data"]["samples_per_gpu"] == 2 and mine["data"]["workers_per_gpu"] == 2


@pytest.mark.parametrize("variant", COCO)
def test_no_setting_added_or_lost(variant):
    theirs, mine = set(published(variant)), set(ours(variant))
    assert theirs - mine == RUNTIME_ONLY
    assert mine - theirs == OURS_ONLY


def test_difference_finder_sees_a_changed_recipe():
    theirs, mine = published("m3"), ours("m3")
    mine["lr_config"]["step"] = [8, 12]
    mine["data"]["train"]["pipeline"][2]["img_scale"] = [1333, 800]
    assert _differences(theirs["lr_config"], mine["lr_config"]) == [".step[1]: published 11, ours 12"]
    assert _differences(theirs["data"], mine["data"]) == [
        ".train.pipeline[2].img_scale: published (1333, 800), ours [1333, 800]"
    ]


def test_pretrained_checkpoint_is_a_placeholder():
    for variant in COCO:
        init_cfg = ours(variant)["model"]["backbone"]["init_cfg"]
        assert init_cfg == {"type": "Pretrained", "checkpoint": None}


def test_set_pretrain_checkpoint(tmp_path):
    cfg = mmcv.Config.fromfile(str(config_file("a4")))
    set_pretrain_checkpoint(cfg, tmp_path / "recnext_a4_distill_300e.pth")
    assert cfg.model.backbone.init_cfg.checkpoint == str(tmp_path / "recnext_a4_distill_300e.pth")
    assert cfg.model.backbone.init_cfg.type == "Pretrained"
    set_pretrain_checkpoint(cfg, None)
    assert cfg.model.backbone.init_cfg is None


def test_set_data_root_rewrites_every_dataset_path(tmp_path):
    cfg = mmcv.Config.fromfile(str(config_file("m3")))
    set_data_root(cfg, tmp_path / "coco")
    root = f"{tmp_path}/coco/"
    assert cfg.data_root == root
    assert cfg.data.train.ann_file == root + "annotations/instances_train2017.json"
    assert cfg.data.train.img_prefix == root + "train2017/"
    for split in ("val", "test"):
        assert cfg.data[split].ann_file == root + "annotations/instances_val2017.json"
        assert cfg.data[split].img_prefix == root + "val2017/"


def test_config_file_names_and_errors():
    assert config_file("recnext_a5").name == "mask_rcnn_recnext_a5_fpn_1x_coco.py"
    with pytest.raises(UnknownModelError, match="no COCO config"):
        config_file("m1")
    with pytest.raises(UnknownModelError, match="m5"):
        config_file("m55")
