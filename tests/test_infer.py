"""`recnext infer`: drawing, file handling and errors, and a tiny Mask R-CNN trained on the synthetic shapes finding them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from recnext_cli import drawing as paint
from recnext_cli import infer
from recnext_cli.errors import IntegrityError, UsageError
from recnext_cli.infer import Detection
from recnext_cli.synthetic import DEFAULT_CLASSES
from recnext_cli.zoo import CONFIG_ROOT

# RecNeXt-M0 Mask R-CNN shrunk to the synthetic shapes, the config `recnext demo` trains.
TINY = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"


def recnext(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recnext_cli", *args], capture_output=True, text=True, timeout=timeout)


def grey_image(width: int = 96, height: int = 64, level: int = 100) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), level, dtype=np.uint8))


def box_iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ---- drawing and files: no model needed ----


def test_draw_tints_masks_in_the_class_colour_and_leaves_the_rest_alone():
    image = grey_image()
    mask = np.zeros((64, 96), dtype=bool)
    mask[30:50, 40:80] = True
    detections = [Detection(2, "triangle", 0.9, (38.0, 28.0, 82.0, 52.0), mask)]
    drawing = np.asarray(paint.draw(image, detections), dtype=np.int32)
    original = np.asarray(image, dtype=np.int32)

    assert drawing.shape == original.shape
    assert (np.asarray(image) == 100).all()  # the input is not drawn on
    colour = np.array(paint.class_colour(2))
    expected = (1 - paint.MASK_OPACITY) * 100 + paint.MASK_OPACITY * colour
    # Inside the mask, away from the box outline: exactly the blend of image and class colour.
    assert np.abs(drawing[35:48, 42:78] - expected).max() <= 1
    # The box outline is in the class colour (its bottom edge, below the label).
    assert (drawing[52, 50] == colour).all()
    # Left of the box and its label (moved left to end inside the image), right of it below the label, and below
    # it, nothing changes.
    assert (drawing[:, :30] == original[:, :30]).all()
    assert (drawing[29:, 84:] == original[29:, 84:]).all()
    assert (drawing[54:] == original[54:]).all()


def test_each_class_gets_its_own_colour_and_box_only_detections_draw_no_mask():
    assert len({paint.class_colour(class_id) for class_id in range(80)}) == 80
    image = grey_image(128, 128)
    detections = [
        Detection(0, "rectangle", 0.8, (10.0, 60.0, 40.0, 90.0), None),
        Detection(1, "ellipse", 0.7, (70.0, 60.0, 100.0, 90.0), None),
    ]
    drawing = np.asarray(paint.draw(image, detections))
    assert tuple(drawing[90, 20]) == paint.class_colour(0)
    assert tuple(drawing[90, 80]) == paint.class_colour(1)
    assert paint.class_colour(0) != paint.class_colour(1)
    assert (drawing[70:85, 15:35] == 100).all()  # no mask: the inside of the box stays as it was


def test_drawing_names_are_distinct_even_when_inputs_share_a_stem():
    names = paint.drawing_names([Path("a/cat.jpg"), Path("b/cat.png"), Path("cat-2.jpg"), Path("dog.jpeg")])
    assert names == ["cat.png", "cat-2.png", "cat-2-2.png", "dog.png"]


def test_write_png_leaves_no_partial_file_when_saving_fails(tmp_path, monkeypatch):
    target = tmp_path / "out" / "x.png"

    def fail_halfway(self, stream, *args, **kwargs):
        stream.write(b"\x89PNG half")
        assert not target.exists(), "bytes went straight to the final name"
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        paint.write_png(grey_image(), target)
    assert list((tmp_path / "out").iterdir()) == []


def test_write_png_replaces_the_target_in_one_step(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    save = Image.Image.save

    def save_checking_target(self, *args, **kwargs):
        save(self, *args, **kwargs)
        assert target.read_bytes() == b"old", "the target changed before the new file was complete"

    monkeypatch.setattr(Image.Image, "save", save_checking_target)
    paint.write_png(grey_image(), target)
    assert Image.open(target).size == (96, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_unreadable_images_raise_usage_errors_naming_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are no image")
    truncated = tmp_path / "truncated.png"
    grey_image().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for path in (tmp_path / "missing.png", broken, truncated, tmp_path):
        with pytest.raises(UsageError) as caught:
            infer.load_image(path)
        assert str(path) in str(caught.value)


def test_load_image_gives_rgb_for_grey_and_rgba_files(tmp_path):
    Image.new("L", (20, 10), 7).save(tmp_path / "grey.png")
    Image.new("RGBA", (20, 10), (1, 2, 3, 0)).save(tmp_path / "rgba.png")
    assert infer.load_image(tmp_path / "grey.png").getpixel((0, 0)) == (7, 7, 7)
    assert infer.load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (1, 2, 3)


# ---- the command without a model ----


def test_infer_help_loads_no_heavy_framework():
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from recnext_cli.cli import app
        result = CliRunner().invoke(app, ["infer", "--help"])
        assert result.exit_code == 0 and "--score-thr" in result.output, result.output
        print(','.join(m for m in ("torch", "mmcv", "mmdet") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_unknown_model_name_is_the_zoo_error_and_exit_2(tmp_path):
    grey_image().save(tmp_path / "x.png")
    result = recnext("infer", "m33", str(tmp_path / "x.png"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown model 'm33'; did you mean m3?")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_out_must_not_be_a_file(tmp_path):
    grey_image().save(tmp_path / "x.png")
    (tmp_path / "taken").write_text("")
    result = recnext("infer", "m3", str(tmp_path / "x.png"), "--out", str(tmp_path / "taken"))
    assert result.returncode == 2
    assert "--out" in result.stderr and "is a file" in result.stderr


# ---- a trained model: the session's tiny training (tests/conftest.py), on the `shapes` set ----


@pytest.fixture(scope="module")
def trained(tiny_training) -> Path:
    """The tiny Mask R-CNN (RecNeXt-M0, 128x128) after two epochs on the synthetic train split."""
    return tiny_training.checkpoint


def ground_truth(shapes, image_path: Path) -> list[tuple[int, tuple[float, float, float, float], np.ndarray]]:
    """(class index, box x0 y0 x1 y1, mask) of every object in one validation image."""
    coco = json.loads(shapes.ann_file("val2017").read_text())
    (image,) = [entry for entry in coco["images"] if entry["file_name"] == image_path.name]
    objects = []
    for annotation in coco["annotations"]:
        if annotation["image_id"] == image["id"]:
            x, y, w, h = annotation["bbox"]
            rles = mask_utils.frPyObjects(annotation["segmentation"], image["height"], image["width"])
            mask = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
            objects.append((annotation["category_id"] - 1, (x, y, x + w, y + h), mask))
    return objects


@pytest.mark.slow
def test_drawn_detections_match_ground_truth_shapes(trained, shapes, tmp_path):
    images = sorted(shapes.image_dir("val2017").glob("*.png"))[:6]
    # What `recnext infer` does: the detector loaded once, then each image detected and drawn.
    detector = infer.load_detector(TINY, trained, "cpu")
    results = [detector.detect(infer.load_image(path), path, 0.3) for path in images]
    assert [result.image_path for result in results] == images
    matches, shapes_found, shape_count = [], 0, 0
    for result in results:
        assert (result.width, result.height) == (128, 128)
        assert [d.score for d in result.detections] == sorted((d.score for d in result.detections), reverse=True)
        assert all(d.score > 0.3 and d.class_name == DEFAULT_CLASSES[d.class_id] for d in result.detections)
        for class_id, box, mask in ground_truth(shapes, result.image_path):
            found = [
                detection
                for detection in result.detections
                if detection.class_id == class_id
                and box_iou(detection.box, box) > 0.5
                and (detection.mask & mask).sum() / (detection.mask | mask).sum() > 0.5
            ]
            matches += [(result, detection) for detection in found]
            shapes_found += bool(found)
            shape_count += 1
    # One match is what the drawing needs; half the shapes leaves a wide margin below what training reaches.
    assert shapes_found >= shape_count / 2, f"{shapes_found} of {shape_count} shapes found (box and mask IoU > 0.5)"

    # Boxes and labels are drawn over the masks, and masks overlapping it blend on top of or beneath its colour: check
    # the fill where none of that happens. A pixel untouched by the boxes and labels keeps its value on both a black
    # and a white canvas; one that changed on either is covered.
    def uncovered_fill(result, detection):
        size = (result.width, result.height)
        outlines = [replace(other, mask=None) for other in result.detections]
        untouched = np.ones((result.height, result.width), dtype=bool)
        for level in (0, 255):
            blank = Image.new("RGB", size, (level, level, level))
            untouched &= (np.asarray(paint.draw(blank, outlines)) == level).all(axis=2)
        others = [other.mask for other in result.detections if other is not detection and other.mask is not None]
        return detection.mask & untouched & ~np.logical_or.reduce([np.zeros_like(untouched), *others])

    result, detection = max(matches, key=lambda match: uncovered_fill(*match).sum())
    fill = uncovered_fill(result, detection)
    assert fill.sum() >= 20, "every matched mask is hidden by boxes, labels or other masks"
    drawing_path = tmp_path / "drawn" / result.image_path.name
    paint.write_png(paint.draw(infer.load_image(result.image_path), result.detections), drawing_path)
    drawing = np.asarray(Image.open(drawing_path).convert("RGB"), dtype=np.int32)
    original = np.asarray(Image.open(result.image_path).convert("RGB"), dtype=np.int32)
    assert drawing.shape == original.shape
    # There, the matched shape is exactly the blend of the image with its class colour, so closer to that colour.
    colour = np.array(paint.class_colour(detection.class_id))
    expected = (1 - paint.MASK_OPACITY) * original[fill] + paint.MASK_OPACITY * colour
    assert np.abs(drawing[fill] - expected).max() <= 1
    assert np.abs(drawing[fill] - colour).mean() < np.abs(original[fill] - colour).mean()


@pytest.mark.slow
def test_cli_reports_unreadable_images_and_still_draws_the_others(trained, shapes, tmp_path):
    first, second = sorted(shapes.image_dir("val2017").glob("*.png"))[:2]
    jpeg = tmp_path / "second.jpg"
    Image.open(second).convert("RGB").save(jpeg, quality=95)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.png"
    folder = tmp_path / "folder"
    folder.mkdir()
    third = folder / "third.png"
    Image.open(sorted(shapes.image_dir("val2017").glob("*.png"))[2]).save(third)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    nothing = str(tmp_path / "nothing-*.png")
    result = recnext("infer", "tiny", str(first), str(missing), str(broken), str(tmp_path / "*.jpg"), str(folder),
                     nothing, "--config", str(TINY), "--checkpoint", str(trained), "--out", str(out), "--device", "cpu",
                     "--json")

    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, result.stderr[-3000:]
    assert nothing in errors[0] and str(missing) in errors[1] and str(broken) in errors[2]
    document = json.loads(result.stdout)
    assert (document["schema"], document["schema_version"], document["score_threshold"]) == ("recnext.infer", 1, 0.3)
    records = document["images"]
    assert [record["image"] for record in records] == [str(first), str(jpeg), str(third)]
    assert sorted(path.name for path in out.iterdir()) == sorted([first.name, "second.png", "third.png"])
    for record, source in zip(records, (first, jpeg, third)):
        assert record["drawing"] == str(out / Path(record["drawing"]).name)
        assert record["detections"], record
        for detection in record["detections"]:
            assert set(detection) == {"class", "class_id", "score", "box", "mask_area", "mask"}
            assert 0.3 < detection["score"] <= 1
            # COCO RLE with str counts, as pycocotools reads it back.
            rle = detection["mask"]
            assert rle["size"] == [record["height"], record["width"]] and isinstance(rle["counts"], str)
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
            assert mask.shape == (record["height"], record["width"]) and int(mask.sum()) == detection["mask_area"]
            x0, y0, x1, y1 = detection["box"]
            rows, columns = np.nonzero(mask)
            if len(rows):  # the mask lies within its box, give or take the rounding of the box's edges
                assert x0 - 2 <= columns.min() and columns.max() <= x1 + 2 and y0 - 2 <= rows.min() <= rows.max() <= y1 + 2
        drawing, original = Image.open(record["drawing"]), Image.open(source).convert("RGB")
        assert drawing.size == original.size == (record["width"], record["height"])
        assert np.any(np.asarray(drawing.convert("RGB")) != np.asarray(original))


@pytest.mark.slow
def test_cli_table_lists_each_detection(trained, shapes, tmp_path):
    from typer.testing import CliRunner

    from recnext_cli.cli import app

    image = sorted(shapes.image_dir("val2017").glob("*.png"))[0]
    result = CliRunner().invoke(app, ["infer", "tiny", str(image), "--config", str(TINY), "--checkpoint",
                                      str(trained), "--out", str(tmp_path), "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "detections" in result.output and image.name in result.output
    assert result.output.count(str(image)) == 1  # named once, however many detections it has
    assert any(name in result.output for name in DEFAULT_CLASSES)
    assert f"drawn: {tmp_path / image.name}" in result.output


@pytest.mark.slow
def test_class_names_come_from_checkpoint_meta_else_the_config(trained, tmp_path):
    import torch

    checkpoint = torch.load(trained, map_location="cpu", weights_only=False)
    renamed = tmp_path / "renamed.pth"
    torch.save({**checkpoint, "meta": {"CLASSES": ("box", "blob", "wedge")}}, renamed)
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": checkpoint["state_dict"]}, bare)
    assert infer.load_detector(TINY, renamed, "cpu").classes == ("box", "blob", "wedge")
    assert infer.load_detector(TINY, bare, "cpu").classes == DEFAULT_CLASSES


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_the_config_is_refused(trained, tmp_path):
    with pytest.raises(IntegrityError, match="does not fit the model"):
        infer.load_detector(CONFIG_ROOT / "mask_rcnn_recnext_m3_fpn_1x_coco.py", trained, "cpu")
