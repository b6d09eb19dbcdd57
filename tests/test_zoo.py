"""The zoo table against the published README and the backbone variants, and model lookup with suggestions."""

from __future__ import annotations

import dataclasses
import re

import pytest

from recnext_cli import variants, zoo
from recnext_cli.errors import UnknownModelError, UsageError
from recnext_cli.nn import recnext

# The model rows of RecNeXt's detection/README.md, verbatim: the zoo must say exactly this.
README_ROWS = """
| RecNeXt-M3 |  41.7  |    63.4     |    45.4     |  38.6  |    60.5     |    41.4     |  5.2ms  | [M3](https://github.com/suous/RecNeXt/releases/download/v1.0/recnext_m3_coco.pth) | [M3](./logs/recnext_m3_coco.json) |
| RecNeXt-M4 |  43.5  |    64.9     |    47.7     |  39.7  |    62.1     |    42.4     |  7.6ms  | [M4](https://github.com/suous/RecNeXt/releases/download/v1.0/recnext_m4_coco.pth) | [M4](./logs/recnext_m4_coco.json) |
| RecNeXt-M5 |  44.6  |    66.3     |    49.0     |  40.6  |    63.5     |    43.5     | 12.4ms  | [M5](https://github.com/suous/RecNeXt/releases/download/v1.0/recnext_m5_coco.pth) | [M5](./logs/recnext_m5_coco.json) |
| RecNeXt-A3 |  42.1  |    64.1     |    46.2     |  38.8  |    61.1     |    41.6     |  8.4ms  | [A3](https://github.com/suous/RecNeXt/releases/download/v2.0/recnext_a3_coco.pth) | [A3](./logs/recnext_a3_coco.json) |
| RecNeXt-A4 |  43.5  |    65.4     |    47.6     |  39.8  |    62.4     |    42.9     | 14.0ms  | [A4](https://github.com/suous/RecNeXt/releases/download/v2.0/recnext_a4_coco.pth) | [A4](./logs/recnext_a4_coco.json) |
| RecNeXt-A5 |  44.4  |    66.3     |    48.9     |  40.3  |    63.3     |    43.4     | 25.3ms  | [A5](https://github.com/suous/RecNeXt/releases/download/v2.0/recnext_a5_coco.pth) | [A5](./logs/recnext_a5_coco.json) |
"""


def readme_rows() -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in README_ROWS.strip().splitlines()]


def test_detection_models_match_the_readme_table_row_by_row():
    rows = readme_rows()
    assert [row[0] for row in rows] == [zoo.MODELS[name].title for name in zoo.DETECTION_MODELS]
    for row in rows:
        model = zoo.get_model(row[0])
        numbers = [float(cell) for cell in row[1:7]] + [float(row[7].removesuffix("ms"))]
        assert dataclasses.astuple(model.metrics) == tuple(numbers)
        assert re.search(r"\((.*)\)", row[8]).group(1) == model.coco.url


def test_every_model_has_its_release_files_and_config():
    for name, model in zoo.MODELS.items():
        tag = {"M": "v1.0", "A": "v2.0"}[name[0].upper()]
        assert (model.name, model.series, model.release_tag) == (name, name[0].upper(), tag)
        assert model.pretrain.url == f"https://github.com/suous/RecNeXt/releases/download/{tag}/recnext_{name}_distill_300e.pth"
        assert (model.pretrain.model, model.pretrain.kind) == (name, zoo.IMAGENET)
        if model.coco is not None:
            assert model.coco.url == f"https://github.com/suous/RecNeXt/releases/download/{tag}/recnext_{name}_coco.pth"
            assert (model.coco.model, model.coco.kind) == (name, zoo.COCO)
            assert model.config == f"configs/mask_rcnn_recnext_{name}_fpn_1x_coco.py"
        else:
            assert model.config is None and model.metrics is None


def test_each_release_file_record_carries_its_backbone_config_and_results():
    for file_name, checkpoint in zoo.CHECKPOINTS.items():
        assert checkpoint is zoo.get_checkpoint(checkpoint.model, pretrain=checkpoint.kind == zoo.IMAGENET)
        assert checkpoint.variant is variants.VARIANTS[checkpoint.model]
        assert checkpoint.url.endswith(f"/{checkpoint.release_tag}/{file_name}")
        if checkpoint.kind == zoo.COCO:
            assert checkpoint.config == zoo.MODELS[checkpoint.model].config and checkpoint.metrics is not None
        else:
            assert checkpoint.config is None and checkpoint.metrics is None
    with pytest.raises(ValueError, match="a COCO file has a config and metrics"):
        dataclasses.replace(zoo.MODELS["m3"].coco, metrics=None)
    with pytest.raises(ValueError, match="hold different backbones"):
        dataclasses.replace(zoo.MODELS["m3"], coco=zoo.MODELS["a3"].coco)


def test_zoo_and_backbone_variants_name_the_same_models():
    assert set(zoo.MODELS) == set(variants.VARIANTS)
    assert set(zoo.DETECTION_MODELS) == {name for name, model in zoo.MODELS.items() if model.coco}
    assert len(zoo.CHECKPOINTS) == len(zoo.MODELS) + len(zoo.DETECTION_MODELS)


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        zoo.MODELS["m3"].coco.sha256 = "0" * 64
    with pytest.raises(TypeError):
        zoo.MODELS["m9"] = zoo.MODELS["m3"]


@pytest.mark.parametrize("spelling", ["m3", "M3", " RecNeXt-M3 ", "recnext_m3"])
def test_lookup_accepts_the_usual_spellings(spelling):
    assert zoo.get_model(spelling) is zoo.MODELS["m3"]


def test_unknown_name_suggests_the_closest_and_lists_all_in_one_line():
    with pytest.raises(UnknownModelError) as failure:
        zoo.get_model("a33")
    assert str(failure.value) == "unknown model 'a33'; did you mean a3? valid: m3, m4, m5, a3, a4, a5, m0, m1, m2, a0, a1, a2"


def test_unknown_name_without_a_close_match_still_lists_the_valid_ones():
    with pytest.raises(UnknownModelError) as failure:
        zoo.get_model("resnet50")
    assert "did you mean" not in str(failure.value) and "valid: m3, m4" in str(failure.value)


def test_classification_only_sizes_have_pretrain_but_no_coco_checkpoint():
    assert zoo.get_checkpoint("m0", pretrain=True).file_name == "recnext_m0_distill_300e.pth"
    with pytest.raises(UsageError, match="ask for its ImageNet weights with --pretrain$"):
        zoo.get_checkpoint("m0", offers_pretrain=True)
    assert zoo.get_checkpoint("a4").file_name == "recnext_a4_coco.pth"


def test_commands_without_pretrain_are_not_told_to_use_it():
    with pytest.raises(UsageError) as failure:
        zoo.get_checkpoint("a1")
    assert "--pretrain" not in str(failure.value) and "detection models: m3, m4, m5, a3, a4, a5" in str(failure.value)
    with pytest.raises(UsageError) as failure:
        zoo.config_path("m2")
    assert "--pretrain" not in str(failure.value)


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_backbone_fingerprints_are_those_of_the_backbones(name):
    assert variants.backbone_fingerprint(recnext.backbone_state_shapes(name)) == variants.VARIANTS[name].fingerprint
    assert zoo.MODELS[name].variant.fingerprint == variants.VARIANTS[name].fingerprint


def test_fingerprints_tell_every_backbone_apart():
    assert len({v.fingerprint for v in variants.VARIANTS.values()}) == len(zoo.MODELS)


def test_pins_name_release_files_and_reach_their_checkpoints():
    for file_name, pin in zoo.PINS.items():
        assert file_name in zoo.CHECKPOINTS
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256) and pin.size > 0
        assert (zoo.CHECKPOINTS[file_name].sha256, zoo.CHECKPOINTS[file_name].size) == (pin.sha256, pin.size)
    unpinned = [checkpoint for name, checkpoint in zoo.CHECKPOINTS.items() if name not in zoo.PINS]
    assert all(not checkpoint.pinned and checkpoint.size is None for checkpoint in unpinned)
