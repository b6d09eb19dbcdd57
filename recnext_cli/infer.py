"""Detection on image files: load an mmdet detector, run it, return plain detections, and draw them onto the image."""

from __future__ import annotations

import colorsys
import copy
import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from recnext_cli.errors import IntegrityError, UsageError

MASK_OPACITY = 0.45
LABEL_PADDING = 2  # pixels between a label's text and the edge of its background
MIN_LABEL_FONT_PX = 8  # smaller, the default font's letters run together
# Successive multiples of the golden ratio spread hues evenly for any number of classes (80 for COCO).
_GOLDEN_RATIO = 0.618033988749895


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


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A saturated colour for a class; nearby class ids get far-apart hues."""
    red, green, blue = colorsys.hsv_to_rgb((class_id * _GOLDEN_RATIO) % 1.0, 0.85, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def draw(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of `image` with translucent masks, then boxes and `class score` labels, each in its class's colour.

    Labels stay whole inside the image, however small it is or however close to its edge a box lies.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    # Lowest score first, so the most confident mask is the one on top where masks overlap.
    for detection in sorted(detections, key=lambda detection: detection.score):
        if detection.mask is not None:
            colour = np.array(class_colour(detection.class_id), dtype=np.float32)
            pixels[detection.mask] = (1 - MASK_OPACITY) * pixels[detection.mask] + MASK_OPACITY * colour
    drawing = Image.fromarray(pixels.round().astype(np.uint8))
    canvas = ImageDraw.Draw(drawing)
    line_width = max(1, round(max(drawing.size) / 400))
    for detection in detections:
        colour = class_colour(detection.class_id)
        canvas.rectangle(detection.box, outline=colour, width=line_width)
        patch = label_patch(detection.class_name, detection.score, colour, drawing.size)
        drawing.paste(patch, label_position(drawing.size, detection.box, patch.size))
    return drawing


def label_patch(class_name: str, score: float, colour: tuple[int, int, int], image_size: tuple[int, int]) -> Image.Image:
    """The `class score` label on its class colour, sized for an image of `image_size` and never wider than it.

    The font grows with the image (10-32 px); where the label would still be wider than the image, the font shrinks
    to MIN_LABEL_FONT_PX and then the class name is shortened with an ellipsis, keeping the score.
    """
    width, height = image_size
    size = min(max(10, round(max(width, height) / 45)), 32)
    score_text = f"{score:.2f}"
    name = class_name
    while True:
        font = ImageFont.load_default(size=size)
        text = f"{name} {score_text}" if name == class_name else f"{name}\u2026 {score_text}"
        left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
        label_width = right - left + 2 * LABEL_PADDING
        if label_width <= width or (size <= MIN_LABEL_FONT_PX and not name):
            break
        if size > MIN_LABEL_FONT_PX:
            size -= 1
        else:
            name = name[:-1]
    patch = Image.new("RGB", (min(label_width, width), min(bottom - top + 2 * LABEL_PADDING, height)), colour)
    ImageDraw.Draw(patch).text((LABEL_PADDING - left, LABEL_PADDING - top), text, fill=text_colour(colour), font=font)
    return patch


def label_position(
    image_size: tuple[int, int], box: tuple[float, float, float, float], label_size: tuple[int, int]
) -> tuple[int, int]:
    """Where a label's top-left corner goes: above the box's top-left corner, or inside its top edge where there is
    no room above, moved left or up as far as needed to stay inside the image."""
    (width, height), (label_width, label_height) = image_size, label_size
    x0, y0 = round(box[0]), round(box[1])
    y = y0 - label_height if y0 >= label_height else y0
    return max(0, min(x0, width - label_width)), max(0, min(y, height - label_height))


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `background` (WCAG contrast ratio; the better is >= 4.58)."""
    black, white = (0, 0, 0), (255, 255, 255)
    return black if contrast_ratio(black, background) >= contrast_ratio(white, background) else white


def contrast_ratio(first: tuple[int, int, int], second: tuple[int, int, int]) -> float:
    """The WCAG 2 contrast ratio of two sRGB colours, from 1 (same luminance) to 21 (black on white)."""
    lighter, darker = sorted((_relative_luminance(first), _relative_luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def _relative_luminance(colour: tuple[int, int, int]) -> float:
    linear = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def mask_rle(mask: np.ndarray) -> dict:
    """A boolean mask as COCO's compressed RLE, JSON-ready: {"size": [height, width], "counts": str}.

    pycocotools.mask.decode gives the mask back after `counts` is encoded to bytes again.
    """
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(side) for side in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def drawing_names(image_paths: Sequence[Path]) -> list[str]:
    """One distinct PNG file name per input image: its stem, with -2, -3, ... added where that name is taken."""
    names: list[str] = []
    for path in image_paths:
        stem, number = Path(path).stem, 1
        name = f"{stem}.png"
        while name in names:
            number += 1
            name = f"{stem}-{number}.png"
        names.append(name)
    return names


def write_png(image: Image.Image, path: Path) -> None:
    """Write `image` to `path` through a temporary file beside it, so `path` is never a partly written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
