"""COCO 2017 on disk: which files each job reads, and what a dataset root lacks."""

from __future__ import annotations

from pathlib import Path

from recnext_cli.errors import DatasetLayoutError

# Annotation file and image folder of each COCO 2017 split, relative to the dataset root (the upstream layout).
COCO_SPLITS = {
    "train2017": ("annotations/instances_train2017.json", "train2017"),
    "val2017": ("annotations/instances_val2017.json", "val2017"),
}
SPLITS_FOR = {"test": ("val2017",), "train": ("train2017", "val2017")}


def coco_layout_problems(data_root: Path, splits: tuple[str, ...]) -> list[str]:
    """The files and folders of the COCO layout that `data_root` lacks, relative to it (empty when complete)."""
    missing = []
    for split in splits:
        annotations, images = COCO_SPLITS[split]
        if not (data_root / annotations).is_file():
            missing.append(annotations)
        if not (data_root / images).is_dir():
            missing.append(images + "/")
    return missing


def expected_tree(data_root: Path, splits: tuple[str, ...]) -> str:
    entries = [COCO_SPLITS[s][0] for s in splits] + [COCO_SPLITS[s][1] + "/" for s in splits]
    return f"{data_root}/{{{', '.join(entries)}}}"


def check_coco_layout(data_root: Path, splits: tuple[str, ...]) -> None:
    missing = coco_layout_problems(data_root, splits)
    if missing:
        raise DatasetLayoutError(
            f"{data_root} is not a COCO 2017 dataset: missing {', '.join(missing)}; expected "
            f"{expected_tree(data_root, splits)} (point --data-root at the folder holding annotations/)"
        )
