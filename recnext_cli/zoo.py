"""The RecNeXt model zoo as data: released checkpoint files, their configs and the published COCO results."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from recnext_cli.errors import EnvironmentProblem, UnknownModelError, UsageError

RELEASES_URL = "https://github.com/suous/RecNeXt/releases/download"
# Model.config paths are relative to this package, which ships the mmdet config files in configs/ as package data.
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

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None


@dataclasses.dataclass(frozen=True)
class Model:
    """A RecNeXt variant: its ImageNet pretraining file and, for the detection sizes, the COCO checkpoint and results."""

    name: str
    series: str
    release_tag: str
    backbone: str  # BACKBONE_FINGERPRINTS[name]: what a checkpoint's backbone keys and shapes must hash to
    pretrain: Checkpoint
    coco: Checkpoint | None = None
    config: str | None = None
    metrics: Metrics | None = None

    @property
    def title(self) -> str:
        return f"RecNeXt-{self.name.upper()}"


# SHA-256 of each backbone's sorted "key:shape" lines (backbone_fingerprint), so the structural check of a download
# needs no torch; tests/test_zoo.py recomputes them from the backbones in recnext_cli/nn.
BACKBONE_FINGERPRINTS = MappingProxyType({
    "m0": "1593bcc6f0e4b65d6989c41a0703050e1b4e2df9bb3115334ca540bf6cba74a3",
    "m1": "0a430c45800dd3d049ce2e8ce3fb222ffc4bc552deb62bb249db2baca83d65e8",
    "m2": "2fb389bacd3414babab21fb7e6ff58c006b44856a30ed07bf9345fa7ccbc46cc",
    "m3": "740e625dea88bd8b2912897d037387f723b5d7906396c64c17e69af89da66535",
    "m4": "c1165101031fe695b640c63c87f5206677cb23736184cbe1b9052b5befe28420",
    "m5": "86dd3b9f2dc612a14725f740f7328ace94e98159552b0a2d1b4bac604fb0bad1",
    "a0": "3d889ae0941b030de49d364dff93d9669065d76dbe8885742ed911d71ebd74b4",
    "a1": "fb6c10ef943cbae4528b3713ba9ffb26e93607c3b82fedad4f3bf58480de2762",
    "a2": "5af7e2e78761e31060c1771879c48b5e7c5c561d87b361abe7e953b8dd20379c",
    "a3": "63e65a74f500bcf9ba3994db1866216b9355682b982e31f35b080354245ef1e1",
    "a4": "96d06aeece85b501248badca0af74967930c947df84058be0cfdbefa5c848617",
    "a5": "14213998a85662007c57fd8069219af2bb280bae6ed55c84419261ab3f1facc1",
})


def backbone_fingerprint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The SHA-256 of backbone `shapes` ({key without prefix: shape}) as BACKBONE_FINGERPRINTS records it."""
    lines = "\n".join(f"{key}:{','.join(map(str, shape))}" for key, shape in sorted(shapes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _checkpoint(name: str, kind: str, tag: str, file_name: str) -> Checkpoint:
    pin = PINS.get(file_name)
    if pin is None:
        return Checkpoint(name, kind, tag, file_name)
    return Checkpoint(name, kind, tag, file_name, pin.sha256, pin.size)


def _model(name: str, metrics: Metrics | None = None) -> Model:
    series = name[0].upper()
    tag = RELEASE_TAGS[series]
    backbone = BACKBONE_FINGERPRINTS[name]
    pretrain = _checkpoint(name, IMAGENET, tag, f"recnext_{name}_distill_300e.pth")
    if metrics is None:
        return Model(name, series, tag, backbone, pretrain)
    coco = _checkpoint(name, COCO, tag, f"recnext_{name}_coco.pth")
    config = f"configs/mask_rcnn_recnext_{name}_fpn_1x_coco.py"
    return Model(name, series, tag, backbone, pretrain, coco, config, metrics)


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
