"""The RecNeXt model zoo as data: released checkpoint files, their configs and the published COCO results."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from types import MappingProxyType

from recnext_cli.errors import EnvironmentProblem, UnknownModelError, UsageError

RELEASES_URL = "https://github.com/suous/RecNeXt/releases/download"
# Model.config paths are relative to this package, which ships the mmdet config files in configs/ as package data.
PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_ROOT = PACKAGE_ROOT / "configs"
# The M series was published with release v1.0, the A series (linear attention) later with v2.0.
RELEASE_TAGS = MappingProxyType({"M": "v1.0", "A": "v2.0"})

COCO = "coco"
IMAGENET = "imagenet"


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Mask R-CNN 1x results on COCO val2017 and latency, as the RecNeXt detection README reports them."""

    box_ap: float
    box_ap50: float
    box_ap75: float
    mask_ap: float
    mask_ap50: float
    mask_ap75: float
    latency_ms: float


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One released weight file. sha256/size stay None until pinned: the first download is then trusted and recorded."""

    model: str  # the variant whose backbone the file holds, e.g. "m3"
    kind: str  # COCO (mmdet Mask R-CNN state dict) or IMAGENET (classification pretraining)
    release_tag: str
    file_name: str
    sha256: str | None = None
    size: int | None = None

    @property
    def url(self) -> str:
        return f"{RELEASES_URL}/{self.release_tag}/{self.file_name}"


@dataclasses.dataclass(frozen=True)
class Model:
    """A RecNeXt variant: its ImageNet pretraining file and, for the detection sizes, the COCO checkpoint and results."""

    name: str
    series: str
    release_tag: str
    pretrain: Checkpoint
    coco: Checkpoint | None = None
    config: str | None = None
    metrics: Metrics | None = None

    @property
    def title(self) -> str:
        return f"RecNeXt-{self.name.upper()}"


def _model(name: str, metrics: Metrics | None = None) -> Model:
    series = name[0].upper()
    tag = RELEASE_TAGS[series]
    pretrain = Checkpoint(name, IMAGENET, tag, f"recnext_{name}_distill_300e.pth")
    if metrics is None:
        return Model(name, series, tag, pretrain)
    coco = Checkpoint(name, COCO, tag, f"recnext_{name}_coco.pth")
    return Model(name, series, tag, pretrain, coco, f"configs/mask_rcnn_recnext_{name}_fpn_1x_coco.py", metrics)


# Detection models first, in the README's order; then the classification-only sizes.
MODELS = MappingProxyType({
    model.name: model
    for model in (
        _model("m3", Metrics(41.7, 63.4, 45.4, 38.6, 60.5, 41.4, 5.2)),
        _model("m4", Metrics(43.5, 64.9, 47.7, 39.7, 62.1, 42.4, 7.6)),
        _model("m5", Metrics(44.6, 66.3, 49.0, 40.6, 63.5, 43.5, 12.4)),
        _model("a3", Metrics(42.1, 64.1, 46.2, 38.8, 61.1, 41.6, 8.4)),
        _model("a4", Metrics(43.5, 65.4, 47.6, 39.8, 62.4, 42.9, 14.0)),
        _model("a5", Metrics(44.4, 66.3, 48.9, 40.3, 63.3, 43.4, 25.3)),
        _model("m0"),
        _model("m1"),
        _model("m2"),
        _model("a0"),
        _model("a1"),
        _model("a2"),
    )
})
DETECTION_MODELS = tuple(name for name, model in MODELS.items() if model.coco)
CHECKPOINTS = MappingProxyType({
    checkpoint.file_name: checkpoint
    for model in MODELS.values()
    for checkpoint in (model.coco, model.pretrain)
    if checkpoint
})


def get_model(name: str) -> Model:
    """The zoo record for `name` ("m3", "M3", "RecNeXt-M3"); an unknown name raises with the closest valid one."""
    key = name.strip().lower().removeprefix("recnext-").removeprefix("recnext_")
    try:
        return MODELS[key]
    except KeyError:
        close = difflib.get_close_matches(key, MODELS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ";"
        raise UnknownModelError(f"unknown model {name!r}{hint} valid: {', '.join(MODELS)}") from None


def get_checkpoint(name: str, pretrain: bool = False) -> Checkpoint:
    """The COCO checkpoint of model `name`, or with pretrain=True its ImageNet pretraining checkpoint."""
    model = get_model(name)
    if pretrain:
        return model.pretrain
    if model.coco is None:
        raise UsageError(
            f"{model.title} is a classification-only size with no COCO checkpoint (detection models: "
            f"{', '.join(DETECTION_MODELS)}); ask for its ImageNet weights with --pretrain"
        )
    return model.coco


def config_path(name: str) -> Path:
    """The mmdet config file of detection model `name`."""
    get_checkpoint(name)  # a classification-only size has no detection config: say so the zoo's way
    path = PACKAGE_ROOT / get_model(name).config
    if not path.is_file():
        raise EnvironmentProblem(f"{path} is missing: reinstall recnext (its configs/ ship inside the package)")
    return path
