"""The RecNeXt model zoo as data: one record per released file (URL, pin, backbone, config, published COCO results)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from recnext_cli.errors import EnvironmentProblem, UnknownModelError, UsageError
from recnext_cli.variants import VARIANTS, Variant

RELEASES_URL = "https://github.com/suous/RecNeXt/releases/download"
# Checkpoint.config paths are relative to this package, which ships the mmdet config files in configs/ as package data.
PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_ROOT = PACKAGE_ROOT / "configs"
# The M series was published with release v1.0, the A series (linear attention) later with v2.0.
RELEASE_TAGS = MappingProxyType({"M": "v1.0", "A": "v2.0"})

COCO = "coco"
IMAGENET = "imagenet"
# Upstream spells a model "RecNeXt-M3" in its README and "recnext_m3" as an mmdet backbone type.
_NAME_PREFIX = re.compile(r"^recnext[-_]", re.IGNORECASE)


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
class Pin:
    """The SHA-256 and byte size of one release file, taken from a copy verified on a trusted network."""

    sha256: str
    size: int


# Release file name -> its pin. `recnext pin` prints lines in exactly this form for cached files, to be pasted here
# after checking them on a trusted network. Empty: the release files were not reachable where recnext is developed, so
# nothing is pinned and every file is trusted on first use (its digest recorded in the cache's manifest).
PINS: Mapping[str, Pin] = MappingProxyType({
})


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One released weight file with all the zoo knows of it: URL, pin, backbone and, for a detector, config and results.

    sha256/size stay None until pinned: the first download is then trusted and recorded.
    """

    variant: Variant  # the backbone the file holds, as a structure: widths, depths, fingerprint, ...
    kind: str  # COCO (mmdet Mask R-CNN state dict) or IMAGENET (classification pretraining)
    release_tag: str
    file_name: str
    sha256: str | None = None
    size: int | None = None
    config: str | None = None  # COCO only: the mmdet config that trained it, relative to PACKAGE_ROOT
    metrics: Metrics | None = None  # COCO only: its results as the RecNeXt detection README reports them

    def __post_init__(self) -> None:
        # A detector file without its recipe and results, or a pretraining file with them, is a mistake in the table.
        if (self.kind == COCO) != (self.config is not None and self.metrics is not None):
            raise ValueError(f"{self.file_name}: a COCO file has a config and metrics, an ImageNet file neither")

    @property
    def model(self) -> str:
        """The zoo key of the size whose backbone the file holds, e.g. "m3"."""
        return self.variant.name

    @property
    def title(self) -> str:
        return self.variant.title

    @property
    def url(self) -> str:
        return f"{RELEASES_URL}/{self.release_tag}/{self.file_name}"

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None


@dataclasses.dataclass(frozen=True)
class Model:
    """A RecNeXt size: its ImageNet pretraining file and, for the detection sizes, its COCO file.

    Everything else (name, backbone, release, config, results) is read from those files' records, so it is said once.
    """

    pretrain: Checkpoint
    coco: Checkpoint | None = None

    def __post_init__(self) -> None:
        if self.coco is not None and self.coco.variant != self.pretrain.variant:
            raise ValueError(f"{self.coco.file_name} and {self.pretrain.file_name} hold different backbones")

    @property
    def variant(self) -> Variant:
        return self.pretrain.variant

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def series(self) -> str:
        return self.variant.series

    @property
    def title(self) -> str:
        return self.variant.title

    @property
    def release_tag(self) -> str:
        return self.pretrain.release_tag

    @property
    def config(self) -> str | None:
        return self.coco.config if self.coco else None

    @property
    def metrics(self) -> Metrics | None:
        return self.coco.metrics if self.coco else None


def _checkpoint(variant: Variant, kind: str, file_name: str, config: str | None = None,
                metrics: Metrics | None = None) -> Checkpoint:
    pin = PINS.get(file_name)
    sha256, size = (pin.sha256, pin.size) if pin else (None, None)
    return Checkpoint(variant, kind, RELEASE_TAGS[variant.series], file_name, sha256, size, config, metrics)


def _model(name: str, metrics: Metrics | None = None) -> Model:
    variant = VARIANTS[name]
    pretrain = _checkpoint(variant, IMAGENET, f"recnext_{name}_distill_300e.pth")
    if metrics is None:
        return Model(pretrain)
    config = f"configs/mask_rcnn_recnext_{name}_fpn_1x_coco.py"
    return Model(pretrain, _checkpoint(variant, COCO, f"recnext_{name}_coco.pth", config, metrics))


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


def model_key(name: str) -> str:
    """The zoo's key for a spelling of a model name: "m3", " M3 ", "RecNeXt-M3" and "recnext_m3" all give "m3".

    Names outside the zoo are normalised the same way ("ResNet" gives "resnet"); only get_model checks them.
    """
    return _NAME_PREFIX.sub("", name.strip()).lower()


def find_model(name: str) -> Model | None:
    """The zoo record for `name` in any spelling model_key accepts, or None when the zoo has no such model."""
    return MODELS.get(model_key(name))


def get_model(name: str) -> Model:
    """The zoo record for `name` ("m3", "M3", "RecNeXt-M3"); an unknown name raises with the closest valid one.

    Every part of recnext that takes a model name resolves it here, so all of them accept the same spellings and
    refuse an unknown one in the same words.
    """
    model = find_model(name)
    if model is None:
        close = difflib.get_close_matches(model_key(name), MODELS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ";"
        raise UnknownModelError(f"unknown model {name!r}{hint} valid: {', '.join(MODELS)}")
    return model


def get_checkpoint(name: str, pretrain: bool = False, *, offers_pretrain: bool = False) -> Checkpoint:
    """The COCO checkpoint of model `name`, or with pretrain=True its ImageNet pretraining checkpoint.

    offers_pretrain: the asking command has a --pretrain option, so the error for a classification-only size names it.
    """
    model = get_model(name)
    if pretrain:
        return model.pretrain
    if model.coco is None:
        remedy = "ask for its ImageNet weights with --pretrain" if offers_pretrain else "use one of those"
        raise UsageError(
            f"{model.title} is a classification-only size with no COCO checkpoint or detection config (detection "
            f"models: {', '.join(DETECTION_MODELS)}); {remedy}"
        )
    return model.coco


def config_path(name: str) -> Path:
    """The mmdet config file of detection model `name`."""
    get_checkpoint(name)  # a classification-only size has no detection config: say so the zoo's way
    path = PACKAGE_ROOT / get_model(name).config
    if not path.is_file():
        raise EnvironmentProblem(f"{path} is missing: reinstall recnext (its configs/ ship inside the package)")
    return path
