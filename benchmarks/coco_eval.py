"""Time mmdet's COCO evaluation of the same detections with pycocotools and with faster-coco-eval; check they agree.

Run: .venv/bin/python benchmarks/coco_eval.py [--images 500] [--detections 100] [--rounds 3] [--size 480x640]
     [--out benchmarks/results/coco_eval.json]

The detections are Mask R-CNN-style results (boxes and RLE masks) made from the ground truth of a synthetic COCO set
(`recnext_cli.synthetic`): every object is found once with a small shift, the other detections are far-off or
mislabelled copies, so the APs lie well inside (0, 1). Each round times `CocoDataset.evaluate(metric=['bbox',
'segm'])` once with each evaluator, each time on a fresh copy of the ground truth, and within it the time spent in
COCOeval (evaluate, accumulate, summarize); the rest (results to JSON and back, loadRes) is the same for both.
Speed-ups are medians over rounds of pycocotools' time / faster-coco-eval's time within the same round. All metrics
must agree to 3 decimals; the script exits 1 when they do not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
from pycocotools import mask as mask_utils

from recnext_cli.bench import machine_info, write_result
from recnext_cli.compat.evaluator import EVALUATORS, use_coco_evaluator
from recnext_cli.synthetic import make_synthetic_coco

TOLERANCE = 1e-3


def shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx) pixels; what leaves the image is cut off, nothing wraps around."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def jittered_detections(dataset, detections_per_image: int, seed: int = 0) -> list:
    """Results for each image of an mmdet CocoDataset as Mask R-CNN's test returns them: per class an (n, 5) array of
    boxes with scores and a list of RLE masks.

    Each ground-truth object gets one detection shifted by about a tenth of its size, scored 0.3 to 1; the others
    (up to `detections_per_image`) copy a random object of the image with a shift of about half its size and a
    random label, scored 0 to 0.6.
    """
    rng = np.random.default_rng(seed)
    coco = dataset.coco
    results = []
    for image_id in dataset.img_ids:
        objects = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        masks = [coco.annToMask(ann) for ann in objects]
        found = [
            (i, 0.1, dataset.cat2label[ann["category_id"]], rng.uniform(0.3, 1.0)) for i, ann in enumerate(objects)
        ]
        others = [
            (rng.integers(len(objects)), 0.5, rng.integers(len(dataset.cat_ids)), rng.uniform(0.0, 0.6))
            for _ in range(max(0, detections_per_image - len(objects)))
        ]
        boxes = [[] for _ in dataset.cat_ids]
        rles = [[] for _ in dataset.cat_ids]
        for index, spread, label, score in found + others:
            _, _, w, h = objects[index]["bbox"]
            dy, dx = np.round(rng.normal(0.0, spread, 2) * (h, w)).astype(int)
            rle = mask_utils.encode(np.asfortranarray(shifted(masks[index], dy, dx)))
            if not mask_utils.area(rle):
                continue
            left, top, width, height = mask_utils.toBbox(rle)
            boxes[label].append([left, top, left + width, top + height, score])
            rles[label].append(rle)
        results.append(([np.array(b, dtype=np.float32).reshape(-1, 5) for b in boxes], rles))
    return results


def coco_metrics(dataset, results, metrics=("bbox", "segm")) -> dict[str, float]:
    """What `dataset.evaluate` reports with the COCOeval in use (numeric metrics only, console output dropped)."""
    # record=True also swallows the warning mmdet re-enables with simplefilter('once') inside evaluate.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True):
        reported = dataset.evaluate(results, metric=list(metrics), logger="silent")
    return {key: value for key, value in reported.items() if isinstance(value, float)}


def stopwatched(cls, seconds: list[float]):
    """`cls` whose evaluate, accumulate and summarize calls append the time they take to `seconds`."""

    def timed(method):
        def run(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - started)

        return run

    methods = ("evaluate", "accumulate", "summarize")
    return type(cls.__name__, (cls,), {name: timed(getattr(cls, name)) for name in methods})


def timed_evaluation(dataset, results, evaluator: str) -> tuple[float, float, dict[str, float]]:
    """(seconds in dataset.evaluate, seconds of those inside COCOeval, metrics) for one evaluation with `evaluator`.

    mmdet's evaluate also writes the results to JSON and reads them back (`results2json`, `loadRes`), the same work
    for both evaluators; the COCOeval share is what the evaluator changes.
    """
    import mmdet.datasets.coco as mmdet_coco

    use_coco_evaluator(evaluator)
    inside = []
    with mock.patch.object(mmdet_coco, "COCOeval", stopwatched(mmdet_coco.COCOeval, inside)):
        started = time.perf_counter()
        metrics = coco_metrics(dataset, results)
        total = time.perf_counter() - started
    return total, sum(inside), metrics


def synthetic_val_set(root: Path, images: int, size: tuple[int, int], seed: int = 0):
    """An mmdet CocoDataset (test mode, no pipeline) over a new synthetic val split of `images` images."""
    from mmdet.datasets import CocoDataset

    info = make_synthetic_coco(root, train_images=1, val_images=images, size=size, objects_per_image=(2, 12),
                               object_size=(16, min(size) // 3), seed=seed)
    with contextlib.redirect_stdout(io.StringIO()):
        return CocoDataset(str(info.ann_file("val2017")), pipeline=[], classes=info.classes, test_mode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="val images of the synthetic set")
    parser.add_argument("--detections", type=int, default=100, help="detections per image, each with a mask")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="480x640", help="image HEIGHTxWIDTH")
    parser.add_argument("--out", type=Path, help="also write the raw results here as JSON")
    args = parser.parse_args(argv)
    machine = machine_info()
    height, width = (int(side) for side in args.size.split("x"))

    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        dataset = synthetic_val_set(Path(root), args.images, (height, width))
        results = jittered_detections(dataset, args.detections)
        detections = sum(len(boxes) for per_image in results for boxes in per_image[0])
        print(f"{args.images} images of {height}x{width}, {len(dataset.coco.anns)} objects, {detections} detections "
              f"with masks (set up in {time.perf_counter() - started:.0f} s)")
        ground_truth = dataset.coco
        total = {name: [] for name in EVALUATORS}
        inside = {name: [] for name in EVALUATORS}
        metrics = {}
        for round_index in range(args.rounds):
            # Every other round in reverse order, so that neither evaluator always inherits the other's garbage.
            for name in EVALUATORS[:: 1 if round_index % 2 == 0 else -1]:
                # A fresh ground truth for every call, as a test run has: both evaluators write into the annotation
                # dicts they read, and faster-coco-eval leaves its RLEs there.
                dataset.coco = copy.deepcopy(ground_truth)
                # The previous call's objects, collected now rather than by a pause inside the timed call.
                gc.collect()
                seconds, cocoeval_seconds, metrics[name] = timed_evaluation(dataset, results, name)
                total[name].append(seconds)
                inside[name].append(cocoeval_seconds)

    baseline, fast = EVALUATORS
    for name in EVALUATORS:
        print(f"{name:>12}: dataset.evaluate median {statistics.median(total[name]):.2f} s "
              f"({', '.join(f'{s:.2f}' for s in total[name])}), "
              f"of which COCOeval {statistics.median(inside[name]):.2f} s")
    speedups = {}
    for part, seconds in (("dataset.evaluate", total), ("COCOeval alone", inside)):
        ratios = [slow / quick for slow, quick in zip(seconds[baseline], seconds[fast])]
        speedups[part] = statistics.median(ratios)
        print(f"speed-up of {part}: {speedups[part]:.2f}x (median of {args.rounds} per-round ratios)")
    print("metrics:", ", ".join(f"{key} {value:.4f}" for key, value in metrics[baseline].items()))
    disagree = {key: (metrics[baseline].get(key), metrics[fast].get(key))
                for key in metrics[baseline].keys() | metrics[fast].keys()
                if key not in metrics[baseline] or key not in metrics[fast]
                or abs(metrics[baseline][key] - metrics[fast][key]) >= TOLERANCE}
    if args.out:
        write_result(args.out, {
            "benchmark": "coco_eval", "images": args.images, "detections": detections, "rounds": args.rounds,
            "machine": machine, "load_average_after": list(os.getloadavg()),
            "median_s": {name: statistics.median(total[name]) for name in EVALUATORS},
            "cocoeval_median_s": {name: statistics.median(inside[name]) for name in EVALUATORS},
            "speedup": speedups["dataset.evaluate"], "cocoeval_speedup": speedups["COCOeval alone"],
            "metrics_agree": not disagree,
        })
    if disagree:
        print(f"metrics disagree (pycocotools, faster): {disagree}")
        return 1
    print(f"all {len(metrics[baseline])} metrics agree to 3 decimals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
