"""A tiny trained Mask R-CNN and its synthetic COCO set, shared by the benchmarks that need real detections.

Run: .venv/bin/python benchmarks/tiny_model.py [--work-dir DIR]

The demo config (RecNeXt-M0, 128x128 images, narrow heads) is trained by `recnext train` on a seeded synthetic
shapes set for two epochs of its train split, as tests/test_fast_test.py trains it: enough for box and mask AP
well above zero, so that AP differences mean something. The set and the checkpoint are kept in the work directory
and reused while the stamp beside them matches the settings and the torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from recnext_cli.synthetic import make_synthetic_coco
from recnext_cli.zoo import CONFIG_ROOT

CONFIG = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"
# Outside the checkout: packaging tests there delete build/.
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / f"recnext-bench-synthetic-{os.getuid()}"
SETTINGS = {"train_images": 48, "val_images": 64, "epochs": 2, "seed": 0, "threads": 1}


def _stamp() -> dict:
    import torch

    return {**SETTINGS, "torch": torch.__version__, "config": CONFIG.read_text()}


def tiny_model(work_dir: Path = DEFAULT_WORK_DIR) -> tuple[Path, Path]:
    """(synthetic COCO root, trained checkpoint), made in `work_dir` unless a matching pair is already there."""
    work_dir = Path(work_dir)
    root, train_dir = work_dir / "coco", work_dir / "train"
    checkpoint, stamp_file = train_dir / "latest.pth", work_dir / "stamp.json"
    stamp = _stamp()
    if checkpoint.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return root, checkpoint
    stamp_file.unlink(missing_ok=True)
    make_synthetic_coco(root, train_images=SETTINGS["train_images"], val_images=SETTINGS["val_images"],
                        seed=SETTINGS["seed"], overwrite=True)
    # One process, the CLI's own training path, on one thread: OpenMP threads spin while they wait for a core, and
    # on a shared machine that multiplies the time.
    command = [sys.executable, "-m", "recnext_cli", "train", "tiny", "--config", str(CONFIG), "--data-root",
               str(root), "--work-dir", str(train_dir), "--device", "cpu", "--gpus", "1", "--seed",
               str(SETTINGS["seed"]), "--cfg-options", f"runner.max_epochs={SETTINGS['epochs']}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(SETTINGS["threads"])}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not checkpoint.is_file():
        raise SystemExit(f"training the tiny model failed ({result.returncode}):\n{result.stderr[-3000:]}")
    stamp_file.write_text(json.dumps(stamp))
    return root, checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    args = parser.parse_args(argv)
    root, checkpoint = tiny_model(args.work_dir)
    print(f"synthetic set {root}, checkpoint {checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
