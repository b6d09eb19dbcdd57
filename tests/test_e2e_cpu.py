"""`recnext train` / `recnext test` end to end on CPU: real torchrun, gloo workers, the synthetic shapes dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from recnext_cli.synthetic import make_synthetic_coco
from recnext_cli.zoo import CONFIG_ROOT

pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")
pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).parent / "configs"
TINY = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"
# 96 training images make 24 iterations per epoch with two workers of two images each: long epochs, because mmcv's
# runner sleeps 2 s at every epoch start; two of them are enough for the box AP to leave zero behind.
EPOCHS = 2


def recnext(*args: str, marker: str = "", timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess; `marker` tags the environment of every process the job starts."""
    env = {**os.environ, "RECNEXT_JOB_MARKER": marker, "PYTHONPATH": str(CONFIGS)}
    return subprocess.run([sys.executable, "-m", "recnext_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def processes_tagged(marker: str) -> list[int]:
    """Live processes whose environment holds RECNEXT_JOB_MARKER=marker."""
    tagged = []
    needle = f"RECNEXT_JOB_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    tagged.append(int(entry.name))
        except OSError:
            continue
    return tagged


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), train_images=96, val_images=16).root


@pytest.fixture(scope="module")
def trained_dir(coco, tmp_path_factory) -> Path:
    """A work dir after a short training with two gloo workers."""
    work_dir = tmp_path_factory.mktemp("train") / "tiny"
    result = recnext("train", "tiny", "--config", str(TINY), "--device", "cpu", "--gpus", "2",
                     "--data-root", str(coco), "--work-dir", str(work_dir),
                     "--cfg-options", f"runner.max_epochs={EPOCHS}")
    assert result.returncode == 0, result.stderr[-4000:]
    return work_dir


def test_training_with_two_workers_leaves_complete_checkpoints_and_a_json_log(trained_dir):
    assert os.readlink(trained_dir / "latest.pth") == f"epoch_{EPOCHS}.pth"
    assert sorted(p.name for p in trained_dir.glob("epoch_*.pth")) == [f"epoch_{n}.pth" for n in range(1, EPOCHS + 1)]
    assert not list(trained_dir.glob(".saving-*"))
    (log,) = trained_dir.glob("*.log.json")
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert {r["epoch"] for r in records if r.get("mode") == "train"} == set(range(1, EPOCHS + 1))


def test_short_training_learns_boxes_and_one_or_two_workers_agree(trained_dir, coco, tmp_path):
    metrics = {}
    for workers in (1, 2):
        out = tmp_path / f"{workers}.json"
        result = recnext("test", "tiny", "--config", str(TINY), "--checkpoint", str(trained_dir / "latest.pth"),
                         "--device", "cpu", "--gpus", str(workers), "--data-root", str(coco), "--out", str(out))
        assert result.returncode == 0, result.stderr[-4000:]
        metrics[workers] = json.loads(out.read_text())["metrics"]
        assert "| tiny |" in result.stdout  # the README-format row
    assert metrics[1] == metrics[2]
    assert metrics[1]["bbox_mAP"] > 0.05, metrics[1]


def test_auto_resume_continues_from_the_last_complete_checkpoint(trained_dir, coco, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "epoch_1.pth").symlink_to(trained_dir / "epoch_1.pth")
    # What a job killed while saving epoch 2 leaves: a staging folder with a torn file, and no epoch_2.pth.
    (resumed / ".saving-x1").mkdir()
    (resumed / ".saving-x1" / "epoch_2.pth").write_bytes(b"torn")
    result = recnext("train", "tiny", "--config", str(TINY), "--device", "cpu", "--gpus", "2", "--auto-resume",
                     "--data-root", str(coco), "--work-dir", str(resumed), "--cfg-options", "runner.max_epochs=2")
    assert result.returncode == 0, result.stderr[-4000:]
    (log,) = resumed.glob("*.log.json")
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert {r["epoch"] for r in records if r.get("mode") == "train"} == {2}
    assert os.readlink(resumed / "latest.pth") == "epoch_2.pth"
    assert not (resumed / ".saving-x1").exists()


def test_one_failing_worker_ends_the_job_with_no_worker_left(coco, tmp_path):
    marker = uuid.uuid4().hex
    result = recnext("train", "tiny", "--config", str(CONFIGS / "mask_rcnn_recnext_tiny_rank1_fails.py"),
                     "--device", "cpu", "--gpus", "2", "--data-root", str(coco), "--work-dir", str(tmp_path / "w"),
                     marker=marker, timeout=300)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert processes_tagged(marker) == []


def test_ctrl_c_stops_torchrun_and_every_worker(coco, tmp_path):
    marker = uuid.uuid4().hex
    env = {**os.environ, "RECNEXT_JOB_MARKER": marker}
    work_dir = tmp_path / "w"
    job = subprocess.Popen([sys.executable, "-m", "recnext_cli", "train", "tiny", "--config", str(TINY),
                            "--device", "cpu", "--gpus", "2", "--data-root", str(coco), "--work-dir", str(work_dir)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Wait until the workers train (mmdet's json log gets its first lines), then press Ctrl-C.
    while not any(p.stat().st_size for p in work_dir.glob("*.log.json")):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-4000:] if job.stderr else ""
        time.sleep(0.2)
    assert len(processes_tagged(marker)) >= 4  # recnext, torchrun and two workers
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=90) == 128 + signal.SIGINT
    assert processes_tagged(marker) == []
