"""What every test shares: no leaked distributed-job variables, and one trained tiny detector per session."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `make test` runs three test processes on two cores: one torch thread each, in the test process and in every job it
# starts (the launcher gives CPU workers the cores divided among them, unless this is set). With more threads than
# cores, oneDNN's threads spin while they wait for one, and an in-process Mask R-CNN step took 66 s instead of 9.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from recnext_cli.runners import TORCHRUN_VARIABLES  # noqa: E402
from recnext_cli.synthetic import SyntheticInfo, make_synthetic_coco
from recnext_cli.zoo import CONFIG_ROOT


@pytest.fixture(autouse=True)
def _no_job_variables_leak():
    # A leaked RANK/WORLD_SIZE reaches every worker a later test starts, which then waits for ranks that never come.
    before = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    leaked = {name: value for name, value in after.items() if value != before[name]}
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    assert not leaked, f"the test changed {leaked} in os.environ and did not put them back"


# ---- one trained tiny detector for every test that needs one ----

CONFIGS = Path(__file__).parent / "configs"
TINY = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"  # RecNeXt-M0 Mask R-CNN for 128x128 shapes
# 96 training images make 24 iterations per epoch with two workers of two images each; two epochs leave the box and
# mask AP well above zero and find most shapes of the validation images.
TINY_EPOCHS = 2


def recnext(*args: str, marker: str = "", timeout: float = 600, extra_path: str | None = None,
            extra_env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess; `marker` tags the environment of every process the job starts."""
    path = os.pathsep.join(filter(None, (extra_path, str(CONFIGS))))
    env = {**os.environ, "RECNEXT_JOB_MARKER": marker, "PYTHONPATH": path, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "recnext_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


@dataclasses.dataclass(frozen=True)
class TinyTraining:
    shapes: SyntheticInfo  # the dataset it was trained on (its val2017 for testing)
    work_dir: Path
    result: subprocess.CompletedProcess  # the finished `recnext train`

    @property
    def checkpoint(self) -> Path:
        return self.work_dir / "latest.pth"


def once_per_run(tmp_path_factory, name: str, build) -> tuple[Path, dict]:
    """(folder, record) of `build(folder)`, run once per test run even across pytest-xdist's processes.

    `build` fills the folder and returns a JSON-able record; whichever process gets here first builds under a file
    lock while the others wait, then all read the record. Without xdist the folder is this session's own.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the run's folder, not ours
    folder, record = shared / name, shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.exists():
            document = build(folder)
            record.write_text(json.dumps(document))
    return folder, json.loads(record.read_text())


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> SyntheticInfo:
    """The seeded synthetic shapes set: 96 training and 16 validation images (made once per run)."""

    def build(folder: Path) -> dict:
        info = make_synthetic_coco(folder, train_images=96, val_images=16)
        return {**dataclasses.asdict(info), "root": str(info.root)}

    _, record = once_per_run(tmp_path_factory, "shapes", build)
    return SyntheticInfo(**{**record, "root": Path(record["root"]), "classes": tuple(record["classes"])})


@pytest.fixture(scope="session")
def tiny_training(shapes, tmp_path_factory) -> TinyTraining:
    """`recnext train` of the tiny detector on `shapes` with two gloo workers, once for the whole run."""
    pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")

    def build(folder: Path) -> dict:
        result = recnext("train", "tiny", "--config", str(TINY), "--device", "cpu", "--gpus", "2",
                         "--data-root", str(shapes.root), "--work-dir", str(folder),
                         "--cfg-options", f"runner.max_epochs={TINY_EPOCHS}")
        assert result.returncode == 0, result.stderr[-4000:]
        return {"args": result.args, "returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}

    work_dir, record = once_per_run(tmp_path_factory, "tiny-training", build)
    return TinyTraining(shapes, work_dir, subprocess.CompletedProcess(**record))
