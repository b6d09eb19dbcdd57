"""ONNX export of a RecNeXt backbone with its BatchNorms folded, checked against PyTorch's outputs with onnxruntime."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

from recnext_cli import zoo
from recnext_cli.errors import EnvironmentProblem, IntegrityError, UsageError

FORMATS = ("onnx",)
# Opset 17 is what onnxruntime has run for years and has every operator the folded backbone needs.
OPSET = 17
TOLERANCE = 1e-4  # largest absolute difference allowed between onnxruntime's and PyTorch's features
RANDOM_SEED = 0
INPUT_NAME = "image"
OUTPUT_NAMES = ("c2", "c3", "c4", "c5")  # the four stage outputs, strides 4, 8, 16, 32 (mmdet's FPN inputs)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What was written and how closely onnxruntime reproduces PyTorch on it."""

    model: str
    path: Path
    input_size: tuple[int, int]  # height, width of the traced and checked input
    weights: str  # where the weights came from, in words
    output_shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float  # onnxruntime vs the same folded model in PyTorch, over all four outputs
    max_abs_diff_published: float  # onnxruntime vs the published (unfolded) PyTorch model
    size_bytes: int

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def default_path(name: str) -> Path:
    return Path(f"recnext_{zoo.get_model(name).name}_backbone.onnx")


def require_export_stack() -> None:
    """Fail before any work when torch, onnx or onnxruntime cannot be imported here."""
    if importlib.util.find_spec("torch") is None:
        raise EnvironmentProblem(f"torch not installed in {sys.executable}; run `recnext setup`")
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise EnvironmentProblem(
            f"{' and '.join(missing)} not installed in {sys.executable}; run `pip install 'recnext[export]'`"
        )


def load_backbone(name: str, checkpoint: Path | None = None):
    """The published backbone `name` in eval mode and, in words, where its weights came from.

    Weights: `checkpoint` if given (a detector or ImageNet checkpoint, or a bare backbone state dict), else the zoo's
    COCO checkpoint when it is cached and verified, else seeded random weights (RANDOM_SEED) with BatchNorm
    statistics away from the identity, so that folding them is exercised as with trained weights.
    """
    from recnext_cli import fetch
    from recnext_cli.bench import random_backbone
    from recnext_cli.nn import build_recnext

    model = zoo.get_model(name)
    if checkpoint is None and model.coco is not None and fetch.cached_state(model.coco).status == fetch.VERIFIED:
        checkpoint = fetch.cached_state(model.coco).path
    if checkpoint is None:
        return random_backbone(model.name, seed=RANDOM_SEED), f"seeded random weights (seed {RANDOM_SEED})"
    backbone = build_recnext(model.name)
    state = _backbone_state(Path(checkpoint))
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's message: a title line, then one line per kind of mismatch (missing, unexpected, wrong shape).
        detail = (str(exc).splitlines()[1:] or [str(exc)])[0].strip()
        raise IntegrityError(f"{checkpoint} does not hold a {model.title} backbone: {detail}") from None
    return backbone.eval(), f"checkpoint {checkpoint}"


def _backbone_state(path: Path) -> dict:
    """The backbone tensors of a checkpoint, unpickled with recnext's weights-only loader (no code in it runs)."""
    import torch

    from recnext_cli.compat.checkpoint import safe_load

    if not path.is_file():
        raise UsageError(f"--checkpoint {path} does not exist; check the path")
    try:
        document = safe_load(str(path), map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise IntegrityError(f"cannot read {path} as a checkpoint: {str(exc).splitlines()[0]}") from None
    if isinstance(document, dict):
        # mmdet keeps the weights under "state_dict", timm/ImageNet training under "model".
        for container in ("state_dict", "model"):
            if isinstance(document.get(container), dict):
                document = document[container]
                break
    if not isinstance(document, dict):
        raise IntegrityError(f"{path} holds a {type(document).__name__}, not a checkpoint dictionary")
    if any(key.startswith("backbone.") for key in document):
        document = {
            key.removeprefix("backbone."): value for key, value in document.items() if key.startswith("backbone.")
        }
    # An ImageNet checkpoint's classifier is no part of the feature extractor.
    return {
        key: value for key, value in document.items() if isinstance(value, torch.Tensor) and not key.startswith("head.")
    }


def fold_for_export(backbone):
    """A copy of `backbone` as the fast path folds it, in the portable NCHW layout (no oneDNN-only operators)."""
    import copy

    from recnext_cli.fastpath import FastPath, prepare_for_inference

    return prepare_for_inference(copy.deepcopy(backbone), FastPath(fold_batchnorm=True, channels_last=False))


def export_backbone(
    name: str,
    out: Path,
    input_size: tuple[int, int] = (512, 512),
    checkpoint: Path | None = None,
) -> ExportResult:
    """Write backbone `name` as ONNX to `out` (replaced in one step) and check it with onnxruntime.

    The graph takes (batch, 3, height, width) float32 images with batch, height and width left dynamic, and returns
    the four stage outputs. It is checked on one seeded input of `input_size`; a file whose outputs differ from
    PyTorch's by more than TOLERANCE is not written and raises IntegrityError.
    """
    import torch

    require_export_stack()
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the .onnx file to write")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    published, weights = load_backbone(name, checkpoint)
    folded = fold_for_export(published)
    height, width = input_size
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(RANDOM_SEED))
    with torch.no_grad():
        expected = [feature.numpy() for feature in folded(image)]
        published_features = [feature.numpy() for feature in published(image)]
    onnx_bytes = _to_onnx(folded, image)
    features = _run_onnxruntime(onnx_bytes, image.numpy())
    max_abs_diff = max(float(abs(got - want).max()) for got, want in zip(features, expected))
    max_abs_diff_published = max(float(abs(got - want).max()) for got, want in zip(features, published_features))
    result = ExportResult(
        model=zoo.get_model(name).name,
        path=out,
        input_size=input_size,
        weights=weights,
        output_shapes=tuple(tuple(feature.shape) for feature in features),
        max_abs_diff=max_abs_diff,
        max_abs_diff_published=max_abs_diff_published,
        size_bytes=len(onnx_bytes),
    )
    if not result.within_tolerance:
        raise IntegrityError(
            f"onnxruntime's features differ from PyTorch's by up to {max_abs_diff:.2e} (over the {TOLERANCE:g} "
            f"allowed); {out} was not written"
        )
    _write_atomically(out, onnx_bytes)
    return result


def _to_onnx(model, image) -> bytes:
    import onnx
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated in favour of the dynamo one, which needs onnxscript;
        # tracing warns about shape arithmetic that the dynamic axes below make symbolic anyway.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (image,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
        )
    onnx_bytes = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(onnx_bytes), full_check=True)
    return onnx_bytes


def _run_onnxruntime(onnx_bytes: bytes, image) -> list:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's business
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUT_NAMES), {INPUT_NAME: image})


def _write_atomically(path: Path, data: bytes) -> None:
    """`path` holds the old file or the new one, never part of one, even if this process dies while writing."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        # mkstemp makes the file private (0600); the finished file gets the permissions any new file would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(descriptor, 0o666 & ~umask)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
