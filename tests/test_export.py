"""`recnext export`: the folded backbone as ONNX, run by onnxruntime against PyTorch for all six detection sizes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from recnext_cli.cli import app
from recnext_cli.errors import IntegrityError, UnknownModelError, UsageError

runner = CliRunner()
needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("torch", "onnx", "onnxruntime")),
    reason="needs torch, onnx and onnxruntime (pip install 'recnext[export]')",
)
DETECTION_SIZES = ("m3", "m4", "m5", "a3", "a4", "a5")


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    # No cached COCO checkpoint: the export uses the seeded random weights the tests rebuild.
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "cache"))


@pytest.fixture
def one_thread():
    # With two threads on two shared cores, OpenMP threads wait on each other whenever another job runs: tracing
    # RecNeXt-M5 took 24 s that way and 10 s on one thread.
    from recnext_cli.bench import torch_threads

    with torch_threads(1):
        yield


def run_onnx(path: Path, image: np.ndarray) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [tensor.name for tensor in session.get_inputs()] == ["image"]
    assert [tensor.name for tensor in session.get_outputs()] == ["c2", "c3", "c4", "c5"]
    return session.run(None, {"image": image})


def torch_features(model, image: np.ndarray) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [feature.numpy() for feature in model(torch.from_numpy(image))]


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["export", "m33"], UnknownModelError, "did you mean m3?"),
        (["export", "m3", "--input", "big"], UsageError, "is not HEIGHTxWIDTH"),
        (["export", "m3", "--input", "16x16"], UsageError, "too small"),
        (["export", "m3", "--checkpoint", "missing.pth"], UsageError, "does not exist"),
    ],
)
def test_bad_input_is_refused_before_any_work(args, error, message):
    result = runner.invoke(app, args)
    assert isinstance(result.exception, error), result.output
    assert message in str(result.exception)


def test_only_onnx_is_offered():
    result = runner.invoke(app, ["export", "m3", "--format", "tflite"])
    assert result.exit_code == 2
    assert "onnx" in result.output


def test_a_missing_onnxruntime_is_one_line_with_the_remedy():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["onnxruntime"] = None  # as if it were not installed
        sys.argv = ["recnext", "export", "m3"]
        from recnext_cli.cli import main
        main()
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: onnxruntime not installed in ") and line.endswith("pip install 'recnext[export]'`")


@needs_onnx
def test_a_checkpoint_of_another_model_is_refused_and_the_old_file_stays(tmp_path):
    import torch

    from recnext_cli.nn import build_recnext

    wrong = tmp_path / "a3.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in build_recnext("a3").state_dict().items()}}, wrong)
    out = tmp_path / "m3.onnx"
    out.write_bytes(b"an earlier export")
    result = runner.invoke(app, ["export", "m3", "--checkpoint", str(wrong), "--out", str(out)])
    assert isinstance(result.exception, IntegrityError)
    assert str(result.exception).startswith(f"{wrong} does not hold a RecNeXt-M3 backbone: ")
    assert out.read_bytes() == b"an earlier export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a3.pth", "m3.onnx"]


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTION_SIZES)
def test_onnx_backbone_matches_pytorch_within_1e_4(name, tmp_path, one_thread):
    from recnext_cli import export
    from recnext_cli.bench import random_backbone

    out = tmp_path / f"{name}.onnx"
    result = export.export_backbone(name, out, (64, 64))
    assert result.path == out and out.stat().st_size == result.size_bytes
    assert result.weights == f"seeded random weights (seed {export.RANDOM_SEED})"
    # Checked here independently of the export's own check, on another batch and size (the axes are dynamic).
    published = random_backbone(name, seed=export.RANDOM_SEED)
    folded = export.fold_for_export(published)
    image = np.random.default_rng(7).standard_normal((2, 3, 96, 128), dtype=np.float32)
    got = run_onnx(out, image)
    for reference, model in (("folded", folded), ("published", published)):
        features = torch_features(model, image)
        assert [array.shape for array in got] == [array.shape for array in features]
        difference = max(float(np.abs(a - b).max()) for a, b in zip(got, features))
        assert difference <= 1e-4, f"{name}: onnxruntime vs the {reference} PyTorch model differ by {difference:.2e}"
    widths = published.out_channels
    assert [array.shape for array in got] == [(2, c, 96 // s, 128 // s) for c, s in zip(widths, (4, 8, 16, 32))]


@needs_onnx
@pytest.mark.slow
def test_cli_exports_the_weights_of_a_checkpoint(tmp_path, one_thread):
    import torch

    from recnext_cli.bench import random_backbone

    trained = random_backbone("m3", seed=5)
    checkpoint = tmp_path / "detector.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": {
        **{f"backbone.{key}": value for key, value in trained.state_dict().items()},
        "neck.lateral_convs.0.conv.weight": torch.zeros(1),
    }}, checkpoint)
    out = tmp_path / "exported.onnx"
    result = runner.invoke(app, ["export", "m3", "--checkpoint", str(checkpoint), "--out", str(out), "--input", "64x96"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"weights: checkpoint {checkpoint}" in result.output
    assert "outputs for a 64x96 image: c2 1x64x16x24, c3 1x128x8x12, c4 1x256x4x6, c5 1x512x2x3" in result.output
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    image = np.random.default_rng(3).standard_normal((1, 3, 64, 64), dtype=np.float32)
    got, want = run_onnx(out, image), torch_features(trained, image)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) <= 1e-4
    # Not the seed-0 weights a run without the checkpoint would export.
    other = torch_features(random_backbone("m3", seed=0), image)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, other)) > 1e-2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
