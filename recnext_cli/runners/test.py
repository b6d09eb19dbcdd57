"""Worker of `recnext test`: one rank of mmdet's test loop; rank 0 evaluates and writes the metrics JSON."""

from __future__ import annotations

import argparse
import json
import numbers
import os
import sys
from pathlib import Path

from recnext_cli.compat.evaluator import EVALUATORS
from recnext_cli.runners import add_common_arguments, load_config, prepare_worker

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
    args = parser.parse_args(argv)
    if args.fp16 and args.device != "cuda":
        parser.error("--fp16 needs --device cuda: mmcv's fp16 mode autocasts through torch.cuda.amp")
    return args


def collection_dir(out: Path) -> Path:
    """Where ranks leave their partial results for rank 0; beside the output, so one shared disk serves every node."""
    return out.parent / f".{out.name}.parts"


def metrics_record(model_name: str, metrics: dict, checkpoint: str, config: str) -> dict:
    """The metrics JSON `recnext results` reads: numeric metrics only (mmdet adds `*_copypaste` strings)."""
    numeric = {key: float(value) for key, value in metrics.items() if isinstance(value, numbers.Real)}
    return {"model": model_name, "metrics": numeric, "checkpoint": checkpoint, "config": config}


def fuse_batch_norms(detector, device: str):
    """`detector` with every BatchNorm folded into a neighbouring conv, for inference (changed in place, returned).

    A RecNeXt backbone goes through recnext's fast path first: mmcv's fuse_conv_bn only folds a conv directly
    followed by its BatchNorm, and would leave 14 of RecNeXt-M0's 53 (the norms between RecConv and the channel
    mixer), whereas RecNeXt's own fuse folds them all. mmcv's pass then folds what the rest of the detector has.
    """
    from mmcv.cnn import fuse_conv_bn

    from recnext_cli.fastpath import prepare_for_inference
    from recnext_cli.nn import RecNeXt

    if isinstance(detector.backbone, RecNeXt):
        detector.backbone = prepare_for_inference(detector.backbone, fused=True, device=device)
    return fuse_conv_bn(detector)


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_worker(args.launcher)
    import torch.distributed as dist
    from mmcv.runner import load_checkpoint
    from mmdet.apis import multi_gpu_test, single_gpu_test
    from mmdet.datasets import build_dataloader, build_dataset, replace_ImageToTensor
    from mmdet.models import build_detector
    from mmdet.utils import build_ddp, build_dp, compat_cfg, setup_multi_processes

    from recnext_cli import compat
    from recnext_cli.compat.evaluator import use_coco_evaluator

    cfg = compat_cfg(load_config(args.config, args.data_root, args.cfg_options))
    setup_multi_processes(cfg)
    # The checkpoint holds every weight: an ImageNet pretrain named in the config would only be loaded and overwritten.
    cfg.model.pretrained = None
    if "init_cfg" in cfg.model.backbone:
        cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg = None
    rank, _ = compat.init_distributed(args.device)
    distributed = dist.is_initialized()

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

    model = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
    checkpoint = load_checkpoint(model, args.checkpoint, map_location="cpu")
    model.CLASSES = checkpoint.get("meta", {}).get("CLASSES", dataset.CLASSES)
    if args.fuse_conv_bn:
        model = fuse_batch_norms(model, args.device)
    if args.fp16:
        from mmcv.runner import wrap_fp16_model

        # As mmdet 2.28's tools/test.py does when a config sets `fp16`: on torch >= 1.6 this switches on the
        # @auto_fp16/@force_fp32 methods (autocast in the network, fp32 box decoding and NMS); weights stay fp32.
        wrap_fp16_model(model)
    if distributed:
        model = build_ddp(model, args.device, device_ids=[int(os.environ["LOCAL_RANK"])], broadcast_buffers=False)
        outputs = multi_gpu_test(model, data_loader, tmpdir=str(collection_dir(args.out)), gpu_collect=False)
    else:
        model = build_dp(model, args.device, device_ids=[0])
        outputs = single_gpu_test(model, data_loader)

    if rank == 0:
        use_coco_evaluator(args.evaluator)
        eval_args = {k: v for k, v in cfg.get("evaluation", {}).items() if k not in EVAL_HOOK_KEYS}
        eval_args["metric"] = args.metrics
        metrics = dataset.evaluate(outputs, **eval_args)
        write_json(args.out, metrics_record(args.model_name, metrics, args.checkpoint, args.config))
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
