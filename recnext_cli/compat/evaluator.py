"""Opt-in switch of the COCOeval class mmdet 2.28's CocoDataset.evaluate uses: pycocotools' or faster-coco-eval's."""

from __future__ import annotations

import functools

from recnext_cli.compat._util import mark, original_of

EVALUATORS = ("pycocotools", "faster")


@functools.cache
def faster_cocoeval():
    """faster-coco-eval's COCOeval, as a drop-in for pycocotools' in mmdet's CocoDataset.evaluate.

    It reads mmdet's ground truth and its `loadRes` detections, both pycocotools COCO objects, only through what the
    two libraries' COCO classes share (getImgIds, getCatIds, getAnnIds, loadAnns, imgs), so they need no conversion.
    What needs adapting is one summary number, `stats[0]`.
    """
    # The pycocotools-replacement class, not COCOeval_faster: it prints its summary to stdout, which mmdet captures
    # into the log as it does for pycocotools; COCOeval_faster logs it at INFO level, below what the workers show.
    from faster_coco_eval.core.faster_eval_api import COCOeval

    class PycocotoolsStatsCOCOeval(COCOeval):
        """Reports `stats` as pycocotools 2.0 does.

        mmdet sets params.maxDets to (100, 300, 1000) and reads stats[0] as mAP. pycocotools averages that one at
        100 detections per image and class (its `_summarize` default), faster-coco-eval 1.8 at maxDets[-1] (1000): the
        two can differ once an image has more than 100 detections of a class (of any class for the proposal metric).
        """

        def summarize(self):
            super().summarize()
            if self.params.iouType in ("bbox", "segm"):
                # pycocotools averages an empty selection to -1 when 100 is not among maxDets.
                self.stats[0] = self._summarize(1, maxDets=100) if 100 in self.params.maxDets else -1

    return PycocotoolsStatsCOCOeval


def use_coco_evaluator(name: str) -> None:
    """From now on in this process, mmdet's bbox/segm/proposal metrics come from `name`'s COCOeval (see EVALUATORS).

    An in-process patch of the name mmdet.datasets.coco imported from its api_wrappers, which evaluate_det_segm
    looks up at every call; "pycocotools" puts mmdet's own class back.
    """
    if name not in EVALUATORS:
        raise ValueError(f"unknown COCO evaluator {name!r}; use one of {', '.join(EVALUATORS)}")
    import mmdet.datasets.coco as mmdet_coco

    pycocotools_cocoeval = original_of(mmdet_coco.COCOeval)
    if name == "pycocotools":
        mmdet_coco.COCOeval = pycocotools_cocoeval
    else:
        mmdet_coco.COCOeval = mark(faster_cocoeval(), pycocotools_cocoeval)

