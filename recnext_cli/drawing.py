"""Drawing detections onto an image (translucent masks, boxes, `class score` labels kept inside the image) and
writing the drawing as a PNG."""

from __future__ import annotations

import colorsys
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from recnext_cli.infer import Detection

MASK_OPACITY = 0.45
LABEL_PADDING = 2  # pixels between a label's text and the edge of its background
MIN_LABEL_FONT_PX = 8  # smaller, the default font's letters run together
# Successive multiples of the golden ratio spread hues evenly for any number of classes (80 for COCO).
_GOLDEN_RATIO = 0.618033988749895


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
