"""`recnext test --fuse-conv-bn / --fp16 / --evaluator`: refused where they cannot run, passed on, same metrics."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recnext_cli.cli import app
from recnext_cli.errors import UsageError
from recnext_cli.runners.test import parse_args
from recnext_cli.zoo import CONFIG_ROOT

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"
BENCHMARK = ROOT / "benchmarks" / "coco_eval.py"
needs_mmdet = pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="needs the mmdet stack (make setup)")


def _coco_tree(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    (root / "val2017").mkdir()
    return root


def test_help_explains_the_three_flags():
    result = CliRunner().invoke(app, ["test", "--help"])
    assert result.exit_code == 0
    # Rich wraps each help text in the right column of the options panel: without the borders it reads on.
    text = " ".join(result.stdout.replace("│", " ").split())
    fuse_help = text.split("--fuse-conv-bn", 1)[1].split("--fp16", 1)[0]
    fp16_help = text.split("--fp16", 1)[1].split("--evaluator", 1)[0]
    evaluator_help = text.split("--evaluator", 1)[1].split("--help", 1)[0]
    assert "BatchNorm" in fuse_help
    assert "half precision" in fp16_help and "CUDA only" in fp16_help
    assert "pycocotools" in evaluator_help and "faster-coco-eval" in evaluator_help


def test_fp16_on_the_cpu_stops_with_one_line_before_any_worker_starts():
    proc = subprocess.run([sys.executable, "-m", "recnext_cli", "test", "m3", "--device", "cpu", "--fp16"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --fp16 runs on CUDA only") and proc.stderr.count("\n") == 1


def test_unknown_evaluator_is_refused():
    result = CliRunner().invoke(app, ["test", "m3", "--device", "cpu", "--evaluator", "lvis", "--dry-run"])
    assert isinstance(result.exception, UsageError)
    assert str(result.exception) == "--evaluator lvis: use one of pycocotools, faster"


def _worker_args(*options: str, tmp_path: Path) -> list[str]:
    """The worker's arguments in the command `recnext test … --dry-run` prints."""
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"")
    data = _coco_tree(tmp_path / "coco")
    result = CliRunner().invoke(app, ["test", "tiny", "--config", str(TINY), "--checkpoint", str(checkpoint),
                                      "--data-root", str(data), *options, "--dry-run"])
    assert result.exit_code == 0, result.output
    command = shlex.split(result.stdout)
    return command[command.index("recnext_cli.runners.test") + 1:]


def test_the_flags_reach_the_workers(tmp_path):
    # Slurm workers run elsewhere: their CUDA is not checked here, so --fp16 passes on a machine without a GPU.
    args = parse_args(_worker_args("--launcher", "slurm", "--fuse-conv-bn", "--fp16", "--evaluator", "faster",
                                   tmp_path=tmp_path))
    assert (args.device, args.fuse_conv_bn, args.fp16, args.evaluator) == ("cuda", True, True, "faster")


def test_without_the_flags_workers_test_as_before(tmp_path):
    worker_args = _worker_args("--device", "cpu", tmp_path=tmp_path)
    assert not {"--fuse-conv-bn", "--fp16", "--evaluator"} & set(worker_args)
    args = parse_args(worker_args)
    assert (args.fuse_conv_bn, args.fp16, args.evaluator) == (False, False, "pycocotools")


def test_a_worker_refuses_fp16_off_cuda(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([str(TINY), "--checkpoint", "w.pth", "--data-root", "d", "--model-name", "m", "--out", "o.json",
                    "--device", "cpu", "--fp16"])
    assert info.value.code == 2
    assert "--fp16 needs --device cuda" in capsys.readouterr().err


@pytest.mark.slow
@needs_mmdet
def test_fusing_leaves_no_batch_norm_and_the_detector_computes_the_same_features(tmp_path):
    import torch
    from mmdet.models import build_detector
    from torch.nn.modules.batchnorm import _BatchNorm

    from recnext_cli import compat
    from recnext_cli.runners import load_config
    from recnext_cli.runners.test import fuse_batch_norms

    # What a worker does before it builds a model, without its parent watch (this process is the test run's).
    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones with mmdet)
    cfg = load_config(str(TINY), tmp_path, [])
    torch.manual_seed(0)
    detector = build_detector(cfg.model).eval()
    with torch.no_grad():
        # Statistics of a trained network, so that folding them changes every weight.
        for module in detector.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    reference = copy.deepcopy(detector)
    fused = fuse_batch_norms(detector, "cpu")
    assert not [name for name, module in fused.named_modules() if isinstance(module, _BatchNorm)]
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, features = reference.extract_feat(images), fused.extract_feat(images)
    for want, got in zip(expected, features, strict=True):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("coco_eval_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def use_coco_evaluator():
    """compat.evaluator's switch, with mmdet's own COCOeval put back after the test."""
    from recnext_cli.compat.evaluator import use_coco_evaluator

    yield use_coco_evaluator
    use_coco_evaluator("pycocotools")


@pytest.mark.slow
@needs_mmdet
def test_faster_coco_eval_reports_what_pycocotools_reports_in_mmdet(tmp_path, use_coco_evaluator):
    import mmdet.datasets.coco as mmdet_coco
    from pycocotools.cocoeval import COCOeval

    from recnext_cli.compat.evaluator import faster_cocoeval

    benchmark = _benchmark_module()
    dataset = benchmark.synthetic_val_set(tmp_path, images=24, size=(256, 256))
    # With 300 detections per image some objects are found only below the 100 best: the class-agnostic proposal
    # metric then tells mAP at 100 detections (pycocotools', what mmdet reports) from mAP at 1000.
    results = benchmark.jittered_detections(dataset, detections_per_image=300)
    metrics = {}
    for evaluator, cocoeval in (("pycocotools", COCOeval), ("faster", faster_cocoeval())):
        use_coco_evaluator(evaluator)
        assert mmdet_coco.COCOeval is cocoeval
        metrics[evaluator] = benchmark.coco_metrics(dataset, results, metrics=("bbox", "segm", "proposal"))
    expected = metrics["pycocotools"]
    assert 0.2 < expected["bbox_mAP"] < 0.9 and 0.2 < expected["segm_mAP"] < 0.9, expected
    assert {"bbox_mAP_75", "segm_mAP_50", "mAP"} <= expected.keys()
    assert metrics["faster"] == pytest.approx(expected, abs=1e-3)


def recnext(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, one CPU worker without torchrun."""
    # One thread: the two cores are shared with other jobs, and OpenMP threads waiting for a busy core spin, which
    # made a 15 s training take minutes.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "recnext_cli", *args, "--device", "cpu", "--gpus", "1"],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def trained(tiny_training) -> tuple[Path, Path]:
    """(synthetic COCO root, checkpoint) of the session's tiny training (tests/conftest.py): boxes well above zero AP."""
    return tiny_training.shapes.root, tiny_training.checkpoint


@pytest.mark.slow
@needs_mmdet
def test_fused_and_faster_evaluated_runs_give_the_plain_runs_metrics(trained, tmp_path):
    root, checkpoint = trained
    runs = {}
    for name, flags in (("plain", []), ("fused", ["--fuse-conv-bn"]), ("faster", ["--evaluator", "faster"])):
        out = tmp_path / f"{name}.json"
        result = recnext("test", "tiny", "--verbose", "--config", str(TINY), "--checkpoint", str(checkpoint),
                         "--data-root", str(root), "--out", str(out), *flags)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = (json.loads(out.read_text())["metrics"], result.stdout)
    plain, plain_log = runs["plain"]
    assert plain["bbox_mAP"] > 0.05 and plain["segm_mAP"] > 0.05, plain
    assert runs["fused"][0] == pytest.approx(plain, abs=1e-3)
    assert runs["faster"][0] == pytest.approx(plain, abs=1e-3)
    # faster-coco-eval announces itself in the log the workers print (shown with --verbose); pycocotools does not.
    assert "COCOeval_opt" in runs["faster"][1] and "COCOeval_opt" not in plain_log
