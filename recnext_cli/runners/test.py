"""Worker of `recnext test`: one rank of mmdet's test loop; rank 0 evaluates and writes the metrics JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from recnext_cli.compat.evaluator import EVALUATORS
from recnext_cli.errors import IntegrityError
from recnext_cli.launch.supervise import RUN_DIR_ENV, RUN_RESULT
from recnext_cli.progress import ProgressWriter
from recnext_cli.results import evaluation_document
from recnext_cli.runners import add_common_arguments, build_detector, load_config, prepare_worker, run_worker
from recnext_cli.runners.progress_hook import route_progress_bars

# Keys of a config's `evaluation` dict that configure mmdet's EvalHook, not dataset.evaluate().
EVAL_HOOK_KEYS = ("interval", "tmpdir", "start", "gpu_collect", "save_best", "rule", "dynamic_intervals", "by_epoch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recnext_cli.runners.test", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="detector weights to test")
    parser.add_argument("--eval", nargs="+", default=["bbox", "segm"], dest="metrics", help="COCO metrics to compute")
    parser.add_argument("--model-name", required=True, help="the name recorded in the metrics JSON")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON that rank 0 writes")
    parser.add_argument("--fuse-conv-bn", action="store_true", help="fold every BatchNorm into a conv before testing")
    parser.add_argument("--fp16", action="store_true", help="run the model in mmdet's fp16 mode (CUDA only)")
    parser.add_argument("--evaluator", choices=EVALUATORS, default="pycocotools", help="COCOeval implementation")
    parser.add_argument("--eval-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="arguments of dataset.evaluate (or format_results), e.g. classwise=True")
    parser.add_argument("--format-only", action="store_true",
                        help="write COCO results JSON (eval option jsonfile_prefix) instead of evaluating")
    parser.add_argument("--show-dir", type=Path, help="draw each image's detections into this folder (rank 0)")
    parser.add_argument("--show-score-thr", type=float, default=0.3, help="lowest score drawn with --show-dir")
    args = parser.parse_args(argv)
    if args.fp16 and args.device != "cuda":
        parser.error("--fp16 needs --device cuda: mmcv's fp16 mode autocasts through torch.cuda.amp")
    return args


def fuse_batch_norms(detector, device: str):
    """`detector` with every BatchNorm folded into a neighbouring conv, for inference (changed in place, returned).

    A RecNeXt backbone goes through recnext's fast path first: mmcv's fuse_conv_bn only folds a conv directly
    followed by its BatchNorm, and would leave 14 of RecNeXt-M0's 53 (the norms between RecConv and the channel
    mixer), whereas RecNeXt's own fuse folds them all. mmcv's pass then folds what the rest of the detector has.
    """
    from mmcv.cnn import fuse_conv_bn

    from recnext_cli.fastpath import speed_up_detector

    return fuse_conv_bn(speed_up_detector(detector, device=device))


def write_json(path: Path, record: dict) -> None:
    """Write `record` to `path` in one step; the temporary name is this writer's own, so two runs never mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False) as file:
        file.write(json.dumps(record, indent=2) + "\n")
    try:
        os.replace(file.name, path)
    except OSError:
        os.unlink(file.name)
        raise


def predict_part(model, data_loader, rank: int, world_size: int) -> list:
    """This rank's share of the predictions, masks RLE-encoded, in its sampler's order (as mmdet's multi_gpu_test)."""
    import mmcv
    import torch
    from mmdet.core import encode_mask_results

    model.eval()
    part = []
    progress = mmcv.ProgressBar(len(data_loader.dataset)) if rank == 0 else None  # events when a launcher reads them
    for data in data_loader:
        with torch.no_grad():
            result = model(return_loss=False, rescale=True, **data)
        if isinstance(result[0], tuple):
            result = [(boxes, encode_mask_results(masks)) for boxes, masks in result]
        part.extend(result)
        if progress is not None:
            for _ in range(len(result) * world_size):
                progress.update()
    return part


def gather_results(part: list, size: int) -> list | None:
    """Every rank's part, through the process group, in dataset order on rank 0 (None on the others).

    No shared folder is needed, whichever machines the ranks run on. The distributed sampler hands rank r the
    indices r, r + world_size, …, padded at the end, so interleaving the parts restores the dataset order.
    """
    import torch.distributed as dist

    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    ordered = [result for group in zip(*parts) for result in group]
    return ordered[:size]


def parse_eval_options(options: list[str]) -> dict:
    """`KEY=VALUE` words as mmdet's tools read them (mmcv's DictAction: True, numbers and lists become values)."""
    from mmcv import DictAction

    parsed = argparse.Namespace()
    DictAction(option_strings=[], dest="options")(None, parsed, options)
    return parsed.options


def draw_predictions(dataset, outputs: list, classes, show_dir: Path, score_thr: float) -> None:
    """Each test image with its detections above `score_thr` drawn as `recnext infer` draws them, as show_dir/<stem>.png."""
    import numpy as np
    import pycocotools.mask as mask_util

    from recnext_cli.drawing import draw, write_png
    from recnext_cli.infer import Detection, load_image

    for info, output in zip(dataset.data_infos, outputs):
        boxes_per_class, masks_per_class = output if isinstance(output, tuple) else (output, None)
        detections = []
        for class_id, boxes in enumerate(boxes_per_class):
            for index, (x0, y0, x1, y1, score) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 5)):
                if score <= score_thr:
                    continue
                mask = None if masks_per_class is None else mask_util.decode(masks_per_class[class_id][index]) > 0
                detections.append(Detection(class_id, classes[class_id], float(score),
                                            (float(x0), float(y0), float(x1), float(y1)), mask))
        image_path = Path(dataset.img_prefix) / info["filename"]
        write_png(draw(load_image(image_path), detections), show_dir / f"{image_path.stem}.png")


def load_weights(model, checkpoint_path: str) -> dict:
    from mmcv.runner import load_checkpoint

    try:
        return load_checkpoint(model, checkpoint_path, map_location="cpu")
    except RuntimeError as exc:  # mmcv's "No state_dict found in checkpoint file": a file that is not a dict
        raise IntegrityError(f"--checkpoint {checkpoint_path}: {exc}; pass an mmdet detector checkpoint") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_worker(args.launcher)
    import torch.distributed as dist
    from mmdet.apis import single_gpu_test
    from mmdet.datasets import build_dataloader, build_dataset, replace_ImageToTensor
    from mmdet.utils import build_ddp, build_dp, compat_cfg, setup_multi_processes

    from recnext_cli import compat
    from recnext_cli.models.config import for_inference

    cfg = compat_cfg(load_config(args.config, args.data_root, args.cfg_options))
    setup_multi_processes(cfg)
    for_inference(cfg)  # the checkpoint holds every weight
    rank, _ = compat.init_distributed(args.device)
    distributed = dist.is_initialized()
    route_progress_bars(ProgressWriter(rank), "test")

    cfg.data.test.test_mode = True
    loader_args = {
        "samples_per_gpu": 1, "workers_per_gpu": 2, "dist": distributed, "shuffle": False,
        **cfg.data.get("test_dataloader", {}),
    }
    if loader_args["samples_per_gpu"] > 1:
        # Batched testing needs padded tensors: mmdet swaps ImageToTensor for DefaultFormatBundle for the same reason.
        cfg.data.test.pipeline = replace_ImageToTensor(cfg.data.test.pipeline)
    dataset = build_dataset(cfg.data.test)
    data_loader = build_dataloader(dataset, **loader_args)

    model = build_detector(cfg, args.device)
    checkpoint = load_weights(model, args.checkpoint)
    model.CLASSES = classes = checkpoint.get("meta", {}).get("CLASSES", dataset.CLASSES)
    if args.fuse_conv_bn:
        model = fuse_batch_norms(model, args.device)
    if args.fp16:
        from mmcv.runner import wrap_fp16_model

        # As mmdet 2.28's tools/test.py does when a config sets `fp16`: on torch >= 1.6 this switches on the
        # @auto_fp16/@force_fp32 methods (autocast in the network, fp32 box decoding and NMS); weights stay fp32.
        wrap_fp16_model(model)
    if distributed:
        model = build_ddp(model, args.device, device_ids=[int(os.environ["LOCAL_RANK"])], broadcast_buffers=False)
        outputs = gather_results(predict_part(model, data_loader, rank, dist.get_world_size()), len(dataset))
    else:
        model = build_dp(model, args.device, device_ids=[0])
        outputs = single_gpu_test(model, data_loader)

    if rank == 0:
        report(args, cfg, dataset, outputs, classes)
    if distributed:
        dist.destroy_process_group()
    return 0


def report(args: argparse.Namespace, cfg, dataset, outputs: list, classes) -> None:
    """Rank 0's part once every prediction is here: pictures, then COCO results files or the metrics JSON."""
    from recnext_cli.compat.evaluator import use_coco_evaluator

    if args.show_dir:
        draw_predictions(dataset, outputs, classes, args.show_dir, args.show_score_thr)
    eval_options = parse_eval_options(args.eval_options)
    if args.format_only:
        # As mmdet's tools/test.py --format-only: files for COCO's evaluation server (test-dev), no metrics.
        dataset.format_results(outputs, **eval_options)
        return
    use_coco_evaluator(args.evaluator)
    eval_args = {k: v for k, v in cfg.get("evaluation", {}).items() if k not in EVAL_HOOK_KEYS}
    eval_args.update(eval_options, metric=args.metrics)
    metrics = dataset.evaluate(outputs, **eval_args)
    record = evaluation_document(args.model_name, metrics, args.checkpoint, args.config)
    write_json(args.out, record)
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir and os.path.isdir(run_dir):
        # This run's own copy for the launcher, which is on this machine: another run may replace --out meanwhile.
        write_json(Path(run_dir) / RUN_RESULT, record)


if __name__ == "__main__":
    sys.exit(run_worker(main))
