"""`recnext infer` without a model: folders and globs as inputs, masks as COCO RLE, labels legible on small images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from recnext_cli import drawing as paint
from recnext_cli import infer
from recnext_cli.pipelines import expand_images
from recnext_cli.infer import Detection


def grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (100, 100, 100))


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grey(8, 8).save(path)
    return path


def test_folders_and_globs_expand_to_image_files_in_order_each_once(tmp_path):
    b = touch_image(tmp_path / "photos" / "b.png")
    a = touch_image(tmp_path / "photos" / "a.JPG")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    nested = touch_image(tmp_path / "photos" / "deeper" / "c.png")
    loose = touch_image(tmp_path / "loose.png")
    missing = tmp_path / "missing.png"
    images, problems = expand_images([
        loose, tmp_path / "photos", Path(f"{tmp_path}/photos/**/*.png"), missing, loose,
    ])
    # The folder gives its own images (not the sub-folder's, not the text file); ** reaches the nested one.
    assert images == [loose, a, b, nested, missing]
    assert problems == []


def test_a_folder_or_pattern_without_images_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    images, problems = expand_images([tmp_path / "empty", Path(f"{tmp_path}/none-*.png")])
    assert images == []
    assert problems == [
        f"no image file in the folder {tmp_path / 'empty'} (looked for .bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp)",
        f"no file matches {tmp_path}/none-*.png; check the pattern",
    ]


def test_no_image_at_all_stops_before_any_download(tmp_path):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "RECNEXT_HOME": str(tmp_path / "cache"), "RECNEXT_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "recnext_cli", "infer", "m3", str(tmp_path / "empty")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: no image file at {tmp_path / 'empty'}; check the path"]
    assert not (tmp_path / "cache").exists()


def test_masks_go_out_as_coco_rle_that_pycocotools_decodes_back():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = infer.mask_rle(mask)
    assert set(rle) == {"size", "counts"} and rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    json.dumps(rle)  # plain JSON, no bytes
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    assert decoded.dtype == np.uint8 and np.array_equal(decoded.astype(bool), mask)
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}) == mask.sum()


def _text_pixels(patch: Image.Image, background: tuple[int, int, int]) -> int:
    return int((np.asarray(patch) != np.array(background)).any(axis=2).sum())


@pytest.mark.parametrize(
    "box",
    [
        (50.0, 56.0, 63.0, 63.0),  # bottom-right corner: the label must move left and up
        (0.0, 0.0, 20.0, 10.0),  # top-left corner: no room above the box
        (30.0, 30.0, 34.0, 34.0),  # a small box in the middle, label wider than the room to its right
    ],
)
def test_labels_on_a_64x64_image_stay_whole_inside_it(box):
    image = grey(64, 64)
    detection = Detection(2, "triangle", 0.97, box, None)
    drawing = paint.draw(image, [detection])
    colour = paint.class_colour(2)
    patch = paint.label_patch("triangle", 0.97, colour, image.size)
    x, y = paint.label_position(image.size, box, patch.size)
    assert 0 <= x and x + patch.width <= 64 and 0 <= y and y + patch.height <= 64
    # What is in the image there is the whole label, nothing cut off.
    assert np.array_equal(np.asarray(drawing.crop((x, y, x + patch.width, y + patch.height))), np.asarray(patch))
    # And the label holds all of its text: the same text drawn with room to spare has as many text pixels.
    font = ImageFont.load_default(size=10)
    roomy = Image.new("RGB", (200, 40), colour)
    ImageDraw.Draw(roomy).text((5, 5), "triangle 0.97", fill=paint.text_colour(colour), font=font)
    assert _text_pixels(patch, colour) == _text_pixels(roomy, colour) > 50


def test_a_label_too_long_for_a_small_image_is_shortened_and_keeps_its_score():
    patch = paint.label_patch("a very long class name indeed", 0.5, paint.class_colour(0), (64, 64))
    assert patch.width <= 64 and patch.height >= 8
    # On a large image the same label is written out in full, in a bigger font.
    large = paint.label_patch("a very long class name indeed", 0.5, paint.class_colour(0), (1280, 960))
    assert large.width > 200 and large.height > patch.height


def test_label_text_contrasts_with_every_class_colour():
    ratios = [paint.contrast_ratio(paint.text_colour(c), c) for c in map(paint.class_colour, range(80))]
    # WCAG's 4.5:1 for normal text; black or white always reaches at least 4.58 against an opaque colour.
    assert min(ratios) >= 4.5
    assert paint.contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21)
