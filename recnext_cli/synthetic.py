"""A seeded synthetic COCO-2017-style dataset of coloured shapes with exact instance masks, for CPU training and tests."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from recnext_cli.errors import DatasetLayoutError, UsageError

# One saturated colour per shape. Every object pixel stays within OBJECT_NOISE of its colour on each channel, and
# every background pixel lies in BACKGROUND_RANGE on each channel; each colour has a channel at least 45 levels
# outside that range, so a pixel's owner (background or which class) can be read back from the image alone.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "rectangle": (220, 50, 50),
    "ellipse": (50, 205, 70),
    "triangle": (50, 90, 220),
    "diamond": (230, 210, 40),
}
OBJECT_NOISE = 15
BACKGROUND_RANGE = (60, 160)
DEFAULT_CLASSES = ("rectangle", "ellipse", "triangle")
SPLITS = ("train2017", "val2017")

# Empty pixels kept between the boxes of two objects: pycocotools rasterises a polygon up to a pixel beyond its
# vertices, and a gap keeps every mask exact (no object ever hides part of another).
_GAP = 3
_ELLIPSE_VERTICES = 48
_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class SyntheticInfo:
    """Where a generated dataset lives and what it holds; paths follow mmdet's COCO layout."""

    root: Path
    classes: tuple[str, ...]
    images: dict[str, int]
    instances: dict[str, int]
    seed: int

    def ann_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def image_dir(self, split: str) -> Path:
        return self.root / split


def make_synthetic_coco(
    root: Path,
    *,
    train_images: int = 64,
    val_images: int = 16,
    size: tuple[int, int] = (128, 128),
    classes: Sequence[str] = DEFAULT_CLASSES,
    objects_per_image: tuple[int, int] = (1, 4),
    object_size: tuple[int, int] = (20, 60),
    mask_format: Literal["polygon", "rle"] = "polygon",
    seed: int = 0,
    overwrite: bool = False,
) -> SyntheticInfo:
    """Write `root/annotations/instances_{train,val}2017.json` and `root/{train,val}2017/*.png`.

    The same arguments give byte-identical files. Each image is drawn from its own random stream
    (seed, split, index), so changing the number of images of one split leaves the others unchanged.
    `mask_format="polygon"` stores polygons as COCO does for non-crowd objects; "rle" stores compressed RLE.
    Both describe exactly the painted pixels, because the pixels are painted from pycocotools' own rasterisation.
    """
    root = Path(root)
    classes = tuple(classes)
    _check_arguments(train_images, val_images, size, classes, objects_per_image, object_size, mask_format)
    _prepare_root(root, overwrite)
    categories = [{"id": index + 1, "name": name, "supercategory": "shape"} for index, name in enumerate(classes)]
    counts = {"train2017": train_images, "val2017": val_images}
    instances = {}
    for split_number, split in enumerate(SPLITS):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for index in range(counts[split]):
            rng = np.random.default_rng([seed, split_number, index])
            image_id = index + 1
            file_name = f"{image_id:012d}.png"
            pixels, objects = _render_image(rng, size, classes, objects_per_image, object_size)
            # PNG is lossless, so the pixels on disk are exactly the ones the masks were painted from.
            Image.fromarray(pixels).save(root / split / file_name, format="PNG")
            images.append({"id": image_id, "file_name": file_name, "height": size[0], "width": size[1]})
            for category_id, polygon, rle in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, category_id, polygon, rle, mask_format))
        coco = {
            "info": {"description": f"recnext synthetic shapes, seed {seed}", "version": "1.0", "year": 2017},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        ann_file = root / "annotations" / f"instances_{split}.json"
        ann_file.write_text(json.dumps(coco, separators=(",", ":")), encoding="utf-8")
        instances[split] = len(annotations)
    return SyntheticInfo(root=root, classes=classes, images=counts, instances=instances, seed=seed)


def _check_arguments(train_images, val_images, size, classes, objects_per_image, object_size, mask_format) -> None:
    unknown = [name for name in classes if name not in SHAPE_COLOURS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise UsageError(f"classes must be distinct names among {', '.join(SHAPE_COLOURS)}; got {list(classes)}")
    if train_images < 1 or val_images < 1:
        raise UsageError(f"need at least one train and one val image; got {train_images} and {val_images}")
    low, high = object_size
    if not 8 <= low <= high <= min(size) - 2 * _GAP:
        raise UsageError(
            f"object_size {object_size} must satisfy 8 <= min <= max <= {min(size) - 2 * _GAP} for images of size {size}"
        )
    if not 1 <= objects_per_image[0] <= objects_per_image[1]:
        raise UsageError(f"objects_per_image {objects_per_image} must satisfy 1 <= min <= max")
    if mask_format not in ("polygon", "rle"):
        raise UsageError(f"mask_format must be 'polygon' or 'rle'; got {mask_format!r}")


def _prepare_root(root: Path, overwrite: bool) -> None:
    ours = [root / split for split in SPLITS] + [root / "annotations" / f"instances_{split}.json" for split in SPLITS]
    existing = [path for path in ours if path.exists()]
    if existing and not overwrite:
        raise DatasetLayoutError(
            f"{root} already holds a dataset ({existing[0].name}); choose an empty directory or pass overwrite=True "
            "(--overwrite) to replace train2017/, val2017/ and the two instances_*.json files"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (root / "annotations").mkdir(parents=True, exist_ok=True)


def _render_image(rng, size, classes, objects_per_image, object_size):
    """Paint a textured background and non-overlapping shapes; return the pixels and (category, polygon, rle) per object."""
    height, width = size
    pixels = _background(rng, height, width)
    boxes: list[tuple[float, float, float, float]] = []
    objects = []
    for _ in range(int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))):
        box = _place_box(rng, height, width, object_size, boxes)
        if box is None:
            continue
        boxes.append(box)
        class_index = int(rng.integers(len(classes)))
        name = classes[class_index]
        polygon = _polygon(rng, name, box)
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
        mask = mask_utils.decode(rle).astype(bool)
        colour = np.array(SHAPE_COLOURS[name], dtype=np.int16)
        texture = rng.integers(-OBJECT_NOISE, OBJECT_NOISE + 1, size=(int(mask.sum()), 3), dtype=np.int16)
        pixels[mask] = (colour + texture).clip(0, 255).astype(np.uint8)
        objects.append((class_index + 1, polygon, rle))
    return pixels, objects


def _background(rng, height: int, width: int) -> np.ndarray:
    """A grey level, a gentle linear gradient and per-pixel noise, kept inside BACKGROUND_RANGE."""
    low, high = BACKGROUND_RANGE
    base = rng.uniform(low + 30, high - 30, size=3)
    slope = rng.uniform(-20, 20, size=2)
    rows = np.linspace(-0.5, 0.5, height)[:, None, None]
    cols = np.linspace(-0.5, 0.5, width)[None, :, None]
    noise = rng.integers(-8, 9, size=(height, width, 3))
    return (base + slope[0] * rows + slope[1] * cols + noise).round().clip(low, high).astype(np.uint8)


def _place_box(rng, height, width, object_size, boxes):
    """A box (x0, y0, w, h) that keeps _GAP pixels from the border and from every box already placed, or None."""
    for _ in range(_PLACEMENT_TRIES):
        side = rng.uniform(object_size[0], object_size[1])
        aspect = rng.uniform(0.6, 1.0)
        w, h = (side, side * aspect) if rng.random() < 0.5 else (side * aspect, side)
        x0 = rng.uniform(_GAP, width - _GAP - w)
        y0 = rng.uniform(_GAP, height - _GAP - h)
        if all(
            x0 + w + _GAP <= bx or bx + bw + _GAP <= x0 or y0 + h + _GAP <= by or by + bh + _GAP <= y0
            for bx, by, bw, bh in boxes
        ):
            return x0, y0, w, h
    return None


def _polygon(rng, name: str, box) -> list[float]:
    """The shape's outline inside `box`, as a flat COCO polygon [x1, y1, x2, y2, ...] rounded to 0.01 px."""
    x0, y0, w, h = box
    cx, cy, rx, ry = x0 + w / 2, y0 + h / 2, w / 2, h / 2
    if name == "rectangle":
        points = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    elif name == "diamond":
        points = [(cx, y0), (x0 + w, cy), (cx, y0 + h), (x0, cy)]
    else:
        # Triangles point in a random direction; both they and ellipses stay inside the ellipse inscribed in the box.
        count, start = (3, rng.uniform(0, 2 * math.pi)) if name == "triangle" else (_ELLIPSE_VERTICES, 0.0)
        angles = start + 2 * math.pi * np.arange(count) / count
        points = list(zip(cx + rx * np.cos(angles), cy + ry * np.sin(angles)))
    # Rounding first makes the JSON polygon and the rasterised mask describe the very same coordinates.
    return [round(float(value), 2) for point in points for value in point]


def _annotation(ann_id, image_id, category_id, polygon, rle, mask_format) -> dict:
    x, y, w, h = (float(value) for value in mask_utils.toBbox(rle))
    if mask_format == "polygon":
        segmentation = [polygon]
    else:
        segmentation = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recnext_cli.synthetic", description="Write a seeded synthetic COCO-2017-style dataset of shapes."
    )
    parser.add_argument("root", type=Path, help="directory to create (gets annotations/, train2017/, val2017/)")
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), choices=list(SHAPE_COLOURS))
    parser.add_argument("--mask-format", choices=("polygon", "rle"), default="polygon")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in ROOT")
    args = parser.parse_args(argv)
    try:
        info = make_synthetic_coco(
            args.root,
            train_images=args.train_images,
            val_images=args.val_images,
            size=tuple(args.size),
            classes=args.classes,
            mask_format=args.mask_format,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (UsageError, DatasetLayoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split in SPLITS:
        print(f"{split}: {info.images[split]} images, {info.instances[split]} instances -> {info.ann_file(split)}")
    print(f"classes: {', '.join(info.classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
