"""Detection on image files: load an mmdet detector, run it, return plain detections (masks also as COCO RLE).

Drawing them is recnext_cli/drawing.py's job."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from recnext_cli.errors import IntegrityError, UsageError


@dataclasses.dataclass(frozen=True, eq=False)
class Detection:
    """One detected object, in pixels of the input image."""

    class_id: int  # index into the detector's class names
    class_name: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    mask: np.ndarray | None  # bool (height, width); None for detectors without a mask head

    @property
    def mask_area(self) -> int | None:
        return None if self.mask is None else int(self.mask.sum())


@dataclasses.dataclass(frozen=True, eq=False)
class ImageResult:
    """The detections above the score threshold on one image, highest score first."""

    image_path: Path
    width: int
    height: int
    detections: tuple[Detection, ...]


def load_image(path: Path) -> Image.Image:
    """The image at `path` as RGB, turned upright as its EXIF orientation says (as mmcv's loader does)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"image {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; pass image files (e.g. {path}/*.jpg)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt files as OSError or SyntaxError, unknown formats as UnidentifiedImageError.
        raise UsageError(f"cannot read {path} as an image ({exc}); pass a readable PNG or JPEG file") from None


class Detector:
    """A detector in eval mode on one device, with its test pipeline and the class names its outputs index.

    `fast_path` says in words what recnext's inference fast path did to the model.
    """

    def __init__(self, model, classes: tuple[str, ...], device: str, pipeline, fast_path: str) -> None:
        self.model = model
        self.classes = classes
        self.device = device
        self.fast_path = fast_path
        self._pipeline = pipeline

    def detect(self, image: Image.Image, image_path: Path, score_thr: float) -> ImageResult:
        """Run the detector on `image` (RGB, read from `image_path`); keep detections scoring above `score_thr`."""
        import torch
        from mmcv.parallel import collate

        # mmdet's pipelines take BGR arrays, as cv2 reads them.
        pixels = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        loaded = {
            "filename": str(image_path),
            "ori_filename": Path(image_path).name,
            "img": pixels,
            "img_shape": pixels.shape,
            "ori_shape": pixels.shape,
            "img_fields": ["img"],
        }
        batch = collate([self._pipeline(loaded)], samples_per_gpu=1)
        # One entry per test-time augmentation, each a batch of one image.
        imgs = [augmented.data[0].to(self.device) for augmented in batch["img"]]
        img_metas = [metas.data[0] for metas in batch["img_metas"]]
        with torch.no_grad():
            (output,) = self.model(return_loss=False, rescale=True, img=imgs, img_metas=img_metas)
        detections = self._detections(output, score_thr)
        return ImageResult(Path(image_path), image.width, image.height, detections)

    def _detections(self, output, score_thr: float) -> tuple[Detection, ...]:
        """mmdet 2.x results (per-class box arrays, and per-class mask lists for mask heads) as Detection records."""
        boxes_per_class, masks_per_class = output if isinstance(output, tuple) else (output, None)
        if isinstance(masks_per_class, tuple):
            # Mask Scoring R-CNN returns (masks, mask scores).
            masks_per_class = masks_per_class[0]
        if len(boxes_per_class) != len(self.classes):
            raise UsageError(
                f"the model predicts {len(boxes_per_class)} classes but {len(self.classes)} class names were found "
                "(checkpoint meta CLASSES, else the config's data.test.classes); pass the config the checkpoint was "
                "trained with"
            )
        detections = []
        for class_id, boxes in enumerate(boxes_per_class):
            for index, (x0, y0, x1, y1, score) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 5)):
                if score <= score_thr:
                    continue
                mask = None if masks_per_class is None else np.asarray(masks_per_class[class_id][index], dtype=bool)
                box = (float(x0), float(y0), float(x1), float(y1))
                detections.append(Detection(class_id, self.classes[class_id], float(score), box, mask))
        detections.sort(key=lambda detection: -detection.score)
        return tuple(detections)


def load_detector(
    config_path: Path, checkpoint_path: Path, device: str | None = None, fused: bool = True
) -> Detector:
    """The detector `config_path` describes with the weights of `checkpoint_path`, on `device` (default: a GPU if visible).

    `fused`: run it through recnext's inference fast path (same detections); False keeps the published structure.
    """
    config_path, checkpoint_path = Path(config_path), Path(checkpoint_path)
    for what, path in (("config", config_path), ("checkpoint", checkpoint_path)):
        if not path.is_file():
            raise UsageError(f"{what} file {path} does not exist; check the path")
    from recnext_cli import compat, launch
    from recnext_cli.runners import quiet_worker_output

    device = launch.resolve_device(device, launch.visible_gpus(), "none")
    launch.require_runner_stack()
    quiet_worker_output()
    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones with mmdet)
    from mmcv import Config
    from mmcv.runner import CheckpointLoader
    from mmdet.models import build_detector

    from recnext_cli.models.config import for_inference

    cfg = Config.fromfile(str(config_path))
    for_inference(cfg)  # every weight comes from the checkpoint
    model = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
    # Without a logger mmcv prints "load checkpoint from ..." to stdout, where --json output goes.
    checkpoint = CheckpointLoader.load_checkpoint(str(checkpoint_path), map_location="cpu", logger="silent")
    _load_weights(model, checkpoint, checkpoint_path, config_path)
    from recnext_cli.fastpath import choose_fast_path, speed_up_detector

    plan = choose_fast_path(device, fused=fused)
    model = speed_up_detector(model, plan, device=device)
    return Detector(model, _class_names(checkpoint, cfg), device, _test_pipeline(cfg, config_path), plan.describe())


def _load_weights(model, checkpoint, checkpoint_path: Path, config_path: Path) -> None:
    """Load the checkpoint's state dict; a missing or misshapen weight means the config does not fit the file."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise IntegrityError(f"{checkpoint_path} holds no state dict; pass an mmdet detector checkpoint")
    # Weights saved from a (Distributed)DataParallel wrapper carry its attribute name.
    state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        missing, _unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise IntegrityError(
            f"{checkpoint_path} does not fit the model of {config_path}: {str(exc).splitlines()[-1].strip()}; "
            "pass the config it was trained with (--config)"
        ) from None
    if missing:
        raise IntegrityError(
            f"{checkpoint_path} lacks {len(missing)} weights the model of {config_path} needs (first: {missing[0]}); "
            "pass the config it was trained with (--config)"
        )


def _class_names(checkpoint, cfg) -> tuple[str, ...]:
    """Class names from the checkpoint's meta, else the config's test dataset (its `classes`, else its type's)."""
    from mmdet.datasets import DATASETS

    names = checkpoint.get("meta", {}).get("CLASSES")
    if names is None:
        names = cfg.data.test.get("classes")
    if names is None:
        names = DATASETS.get(cfg.data.test.type).CLASSES
    return (names,) if isinstance(names, str) else tuple(names)


def _test_pipeline(cfg, config_path: Path):
    """The config's test pipeline without its first step: `detect` hands it an image already loaded."""
    from mmdet.datasets import replace_ImageToTensor
    from mmdet.datasets.pipelines import Compose

    steps = copy.deepcopy(cfg.data.test.pipeline)
    if not steps or not str(steps[0].get("type", "")).startswith("LoadImage"):
        raise UsageError(f"the test pipeline of {config_path} does not start by loading the image; pass an mmdet config")
    # Batches of one are padded anyway; mmdet's own inference replaces ImageToTensor the same way, and its warning
    # that it did so would only tell the user to change a config that is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message='"ImageToTensor" pipeline is replaced')
        return Compose(replace_ImageToTensor(steps[1:]))


def mask_rle(mask: np.ndarray) -> dict:
    """A boolean mask as COCO's compressed RLE, JSON-ready: {"size": [height, width], "counts": str}.

    pycocotools.mask.decode gives the mask back after `counts` is encoded to bytes again.
    """
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(side) for side in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
