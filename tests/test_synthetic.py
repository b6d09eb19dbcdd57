"""The synthetic COCO generator writes a real, exact, deterministic COCO-2017 tree."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from recnext_cli import synthetic
from recnext_cli.errors import DatasetLayoutError, UsageError
from recnext_cli.synthetic import SHAPE_COLOURS, SPLITS, make_synthetic_coco

SMALL = dict(train_images=6, val_images=4, size=(96, 128))


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module", params=["polygon", "rle"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"coco_{request.param}")
    return make_synthetic_coco(root, mask_format=request.param, classes=tuple(SHAPE_COLOURS), **SMALL)


def test_layout_matches_upstream_coco_tree(dataset):
    root = dataset.root
    assert sorted(path.name for path in (root / "annotations").iterdir()) == [
        "instances_train2017.json",
        "instances_val2017.json",
    ]
    for split in SPLITS:
        coco = load_coco(dataset.ann_file(split))
        assert len(coco.getImgIds()) == dataset.images[split]
        assert len(coco.getAnnIds()) == dataset.instances[split]
        assert sorted(cat["name"] for cat in coco.loadCats(coco.getCatIds())) == sorted(dataset.classes)
        assert sorted(path.name for path in dataset.image_dir(split).iterdir()) == sorted(
            image["file_name"] for image in coco.dataset["images"]
        )
        for image in coco.dataset["images"]:
            with Image.open(dataset.image_dir(split) / image["file_name"]) as pil:
                assert (pil.format, pil.mode, pil.size) == ("PNG", "RGB", (image["width"], image["height"]))
        assert all(1 <= len(coco.getAnnIds(imgIds=[image_id])) <= 4 for image_id in coco.getImgIds())


def test_masks_are_exactly_the_painted_pixels(dataset):
    """Read each pixel's owner back from the PNG by colour; the decoded masks must cover exactly those pixels."""
    for split in SPLITS:
        coco = load_coco(dataset.ann_file(split))
        names = {cat["id"]: cat["name"] for cat in coco.dataset["categories"]}
        for image in coco.dataset["images"]:
            pixels = np.asarray(Image.open(dataset.image_dir(split) / image["file_name"])).astype(np.int16)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            covered = np.zeros(pixels.shape[:2], dtype=np.int32)
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                covered += mask
                colour = np.array(SHAPE_COLOURS[names[ann["category_id"]]])
                near_colour = np.abs(pixels - colour).max(axis=2) <= synthetic.OBJECT_NOISE
                # Pixels of this colour inside the object's own neighbourhood belong to it and to nothing else.
                x, y, w, h = (int(v) for v in ann["bbox"])
                window = np.zeros_like(mask)
                window[max(y - 2, 0) : y + h + 2, max(x - 2, 0) : x + w + 2] = True
                np.testing.assert_array_equal(mask, near_colour & window)
            assert covered.max() <= 1, "masks overlap, so they cannot all be exact"
            low, high = synthetic.BACKGROUND_RANGE
            background = ((pixels >= low) & (pixels <= high)).all(axis=2)
            np.testing.assert_array_equal(background, covered == 0)


def test_bbox_and_area_are_the_mask_bounds(dataset):
    for split in SPLITS:
        coco = load_coco(dataset.ann_file(split))
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann)
            rows, cols = np.nonzero(mask)
            tight = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert ann["bbox"] == [float(v) for v in tight]
            assert ann["area"] == float(mask.sum())
            assert ann["iscrowd"] == 0
            assert 20 * 0.6 - 2 <= max(tight[2:]) <= 60 + 2


def test_ground_truth_scores_perfectly_against_itself(dataset):
    """COCOeval reads our files the way mmdet's CocoDataset.evaluate does; a wrong field would cost AP."""
    coco = load_coco(dataset.ann_file("val2017"))
    for iou_type in ("bbox", "segm"):
        results = []
        for ann in coco.dataset["annotations"]:
            result = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
            if iou_type == "bbox":
                result["bbox"] = ann["bbox"]
            else:
                rle = coco.annToRLE(ann)
                result["segmentation"] = {"size": rle["size"], "counts": rle["counts"]}
            results.append(result)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(coco, coco.loadRes(results), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0), iou_type
        assert evaluation.stats[1] == pytest.approx(1.0), iou_type


def test_polygon_and_rle_describe_the_same_pixels(tmp_path):
    polygon = make_synthetic_coco(tmp_path / "polygon", mask_format="polygon", **SMALL)
    rle = make_synthetic_coco(tmp_path / "rle", mask_format="rle", **SMALL)
    a, b = load_coco(polygon.ann_file("train2017")), load_coco(rle.ann_file("train2017"))
    assert a.getAnnIds() == b.getAnnIds()
    for ann_id in a.getAnnIds():
        (ann_a,), (ann_b,) = a.loadAnns([ann_id]), b.loadAnns([ann_id])
        assert isinstance(ann_a["segmentation"], list) and isinstance(ann_b["segmentation"]["counts"], str)
        np.testing.assert_array_equal(a.annToMask(ann_a), b.annToMask(ann_b))
    assert tree_bytes(polygon.image_dir("train2017")) == tree_bytes(rle.image_dir("train2017"))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = tree_bytes(make_synthetic_coco(tmp_path / "a", seed=3, **SMALL).root)
    again = tree_bytes(make_synthetic_coco(tmp_path / "b", seed=3, **SMALL).root)
    other = tree_bytes(make_synthetic_coco(tmp_path / "c", seed=4, **SMALL).root)
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.endswith(".png"))
    assert first["annotations/instances_train2017.json"] != other["annotations/instances_train2017.json"]


def test_each_image_depends_only_on_seed_split_and_index(tmp_path):
    few = make_synthetic_coco(tmp_path / "few", train_images=2, val_images=1, seed=7)
    many = make_synthetic_coco(tmp_path / "many", train_images=5, val_images=1, seed=7)
    assert tree_bytes(few.image_dir("train2017")).items() <= tree_bytes(many.image_dir("train2017")).items()
    assert tree_bytes(few.image_dir("val2017")) == tree_bytes(many.image_dir("val2017"))


def test_refuses_to_overwrite_unless_asked(tmp_path):
    make_synthetic_coco(tmp_path, seed=1, **SMALL)
    stray = tmp_path / "train2017" / "stray.png"
    stray.write_bytes(b"old")
    with pytest.raises(DatasetLayoutError, match="overwrite"):
        make_synthetic_coco(tmp_path, seed=2, **SMALL)
    info = make_synthetic_coco(tmp_path, seed=2, overwrite=True, **SMALL)
    assert not stray.exists()
    assert json.loads(info.ann_file("val2017").read_text())["info"]["description"].endswith("seed 2")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=("hexagon",)), "classes must be"),
        (dict(classes=("ellipse", "ellipse")), "classes must be"),
        (dict(train_images=0), "at least one"),
        (dict(size=(40, 40), object_size=(20, 60)), "object_size"),
        (dict(objects_per_image=(0, 2)), "objects_per_image"),
        (dict(mask_format="bitmap"), "mask_format"),
    ],
)
def test_rejects_impossible_arguments(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        make_synthetic_coco(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_module_main_writes_a_dataset(tmp_path, capsys):
    argv = [str(tmp_path), "--train-images", "2", "--val-images", "1", "--classes", "diamond", "--seed", "5"]
    assert synthetic.main(argv) == 0
    assert "train2017: 2 images" in capsys.readouterr().out
    assert [cat["name"] for cat in load_coco(tmp_path / "annotations/instances_val2017.json").dataset["categories"]] == [
        "diamond"
    ]
    assert synthetic.main(argv) == 2
    assert "overwrite" in capsys.readouterr().err
