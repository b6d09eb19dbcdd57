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

from tests.conftest import CONFIGS, TINY, recnext
from tests.conftest import TINY_EPOCHS as EPOCHS

pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")
pytestmark = pytest.mark.slow


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
def coco(shapes) -> Path:
    return shapes.root


@pytest.fixture(scope="module")
def training(tiny_training) -> tuple[Path, subprocess.CompletedProcess]:
    """(work dir, the finished `recnext train`) of the session's two-worker training (tests/conftest.py)."""
    return tiny_training.work_dir, tiny_training.result


@pytest.fixture(scope="module")
def trained_dir(training) -> Path:
    return training[0]


def test_training_with_two_workers_leaves_complete_checkpoints_and_a_json_log(trained_dir):
    assert os.readlink(trained_dir / "latest.pth") == f"epoch_{EPOCHS}.pth"
    assert sorted(p.name for p in trained_dir.glob("epoch_*.pth")) == [f"epoch_{n}.pth" for n in range(1, EPOCHS + 1)]
    assert not list(trained_dir.glob(".saving-*"))
    (log,) = trained_dir.glob("*.log.json")
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert {r["epoch"] for r in records if r.get("mode") == "train"} == set(range(1, EPOCHS + 1))
    # The demo config's recipe batch is 4 (auto_scale_lr.base_batch_size): two workers of two images reach it.
    batch = json.loads((trained_dir / "batch.json").read_text())
    assert (batch["workers"], batch["images_per_worker"], batch["accumulation"], batch["effective_batch"]) == (2, 2, 1, 4)
    assert batch["lr"] == batch["recipe_lr"] == 0.001


def test_training_shows_progress_and_keeps_the_workers_output_in_the_work_dir(training):
    work_dir, result = training
    console = result.stdout + result.stderr
    # Not a terminal here: a plain line per logging interval and per finished epoch, from rank 0 only.
    ends = [line for line in result.stderr.splitlines() if line.startswith("training epoch") and "24/24" in line]
    assert [line.split(":")[0] for line in ends] == [f"training epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert all("loss " in line and "lr " in line and "img/s" in line for line in ends)
    assert "batch: 2 worker(s) x 2 image(s) x 1 accumulation step(s) = 4 images per optimizer step" in console
    # None of the workers' own lines (mmdet's logger, torch's and mmcv's warnings) reach the console ...
    assert " - mmdet - INFO - " not in console and "MMCV will release" not in console
    assert "No CUDA runtime" not in console
    # ... they are in the file the command names.
    (log,) = work_dir.glob("train-workers-*.log")
    assert f"worker output (mmdet's log lines, warnings): {log}" in " ".join(result.stderr.split())
    assert " - mmdet - INFO - Epoch [2][20/24]" in log.read_text()


# Imported by every process of a job whose PYTHONPATH holds its folder (Python's site hook). In a torchrun worker it
# moves the process to a working directory of its own and, for ranks other than 0, hides the folder of --out
# behind a private empty file system (a mount namespace): as if each worker ran on a machine of its own.
SEPARATE_MACHINES = """\
import ctypes, os
if "LOCAL_RANK" in os.environ and "RECNEXT_TEST_MACHINES" in os.environ:
    home = os.path.join(os.environ["RECNEXT_TEST_MACHINES"], "rank" + os.environ["RANK"])
    os.makedirs(home, exist_ok=True)
    os.chdir(home)
    if os.environ["RANK"] != "0" and "RECNEXT_TEST_HIDDEN" in os.environ:
        libc = ctypes.CDLL(None, use_errno=True)
        MS_REC, MS_PRIVATE, CLONE_NEWNS = 16384, 1 << 18, 0x20000
        assert libc.unshare(CLONE_NEWNS) == 0, os.strerror(ctypes.get_errno())
        assert libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0, os.strerror(ctypes.get_errno())
        out_dir = os.environ["RECNEXT_TEST_HIDDEN"].encode()
        assert libc.mount(b"tmpfs", out_dir, b"tmpfs", 0, None) == 0, os.strerror(ctypes.get_errno())
        open(os.path.join(home, "disk-hidden"), "w").close()
"""


def private_mounts_work() -> bool:
    """Whether this process may make a mount namespace (root, or CAP_SYS_ADMIN), tried in a throwaway child."""
    probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare(0x20000) != 0)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_short_training_learns_boxes_and_one_or_two_workers_agree(trained_dir, coco, tmp_path):
    # The two workers run as on two machines: working directories of their own and, where mount namespaces are
    # allowed, no shared folder beside --out either: their results can only meet through the process group.
    hidden = private_mounts_work()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SEPARATE_MACHINES)
    metrics = {}
    for workers in (1, 2):
        out_dir = tmp_path / f"out{workers}"
        out_dir.mkdir()
        machines = {"RECNEXT_TEST_MACHINES": str(tmp_path / "machines")}
        if hidden:
            machines["RECNEXT_TEST_HIDDEN"] = str(out_dir)
        result = recnext("test", "tiny", "--config", str(TINY), "--checkpoint", str(trained_dir / "latest.pth"),
                         "--device", "cpu", "--gpus", str(workers), "--data-root", str(coco),
                         "--out", str(out_dir / "result.json"),
                         extra_path=str(tmp_path / "site") if workers == 2 else None,
                         extra_env=machines if workers == 2 else {})
        assert result.returncode == 0, result.stderr[-4000:]
        metrics[workers] = json.loads((out_dir / "result.json").read_text())["metrics"]
        assert "| tiny |" in result.stdout and f"({out_dir / 'result.json'})" in result.stdout  # the README row
        # No partial results beside it; the workers' output, kept beside it, ends with the COCO summary.
        (log,) = out_dir.glob("test-workers-*.log")
        assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in log.read_text()
        assert sorted(path.name for path in out_dir.iterdir()) == ["result.json", log.name]
    assert sorted(path.name for path in (tmp_path / "machines").iterdir()) == ["rank0", "rank1"]
    if hidden:
        assert (tmp_path / "machines" / "rank1" / "disk-hidden").exists()
    assert metrics[1] == metrics[2]
    assert metrics[1]["bbox_mAP"] > 0.05, metrics[1]


def test_format_only_writes_coco_results_and_show_dir_draws_each_image(trained_dir, coco, tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    prefix, show_dir = tmp_path / "submission" / "val", tmp_path / "drawn"
    result = recnext("test", "tiny", "--config", str(TINY), "--checkpoint", str(trained_dir / "latest.pth"),
                     "--device", "cpu", "--gpus", "2", "--data-root", str(coco), "--format-only",
                     "--show-dir", str(show_dir), "--show-score-thr", "0.05",
                     "--eval-options", f"jsonfile_prefix={prefix}")
    assert result.returncode == 0, result.stderr[-4000:]
    ground_truth = COCO(str(coco / "annotations" / "instances_val2017.json"))
    for kind in ("bbox", "segm"):
        detections = ground_truth.loadRes(str(prefix) + f".{kind}.json")
        assert set(detections.getImgIds()) <= set(ground_truth.getImgIds()) and detections.anns
    drawn = sorted(path.stem for path in show_dir.glob("*.png"))
    assert drawn == sorted(Path(image["file_name"]).stem for image in ground_truth.dataset["images"])
    # A drawing differs from its image where detections were drawn.
    first = ground_truth.dataset["images"][0]["file_name"]
    original = Image.open(coco / "val2017" / first).convert("RGB")
    assert list(Image.open(show_dir / f"{Path(first).stem}.png").getdata()) != list(original.getdata())
    assert not (tmp_path / "work_dirs").exists() and "test_result.json" not in result.stderr


def test_eval_options_reach_the_evaluation(trained_dir, coco, tmp_path):
    result = recnext("test", "tiny", "--config", str(TINY), "--checkpoint", str(trained_dir / "latest.pth"),
                     "--device", "cpu", "--gpus", "1", "--data-root", str(coco), "--eval", "bbox", "--verbose",
                     "--eval-options", "classwise=True", "--out", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    # classwise=True makes mmdet print a per-category AP table, which names the classes; --verbose shows the
    # workers' own output live.
    assert all(name in result.stdout + result.stderr for name in ("rectangle", "ellipse", "triangle"))


def test_load_from_without_validation_with_per_worker_seeds(trained_dir, coco, tmp_path):
    work_dir = tmp_path / "finetune"
    result = recnext("train", "tiny", "--config", str(TINY), "--device", "cpu", "--gpus", "2",
                     "--data-root", str(coco), "--work-dir", str(work_dir), "--load-from",
                     str(trained_dir / "latest.pth"), "--no-validate", "--diff-seed", "--deterministic",
                     "--cfg-options", "runner.max_epochs=1", "evaluation.interval=1")
    assert result.returncode == 0, result.stderr[-4000:]
    (log,) = [path for path in work_dir.glob("*.log") if not path.name.startswith("train-workers-")]  # mmdet's
    text = log.read_text()
    assert f"load checkpoint from local path: {(trained_dir / 'latest.pth').resolve()}" in text
    assert "seed 0 (+ rank on each worker)" in text
    (log_json,) = work_dir.glob("*.log.json")
    assert not [line for line in log_json.read_text().splitlines() if '"mode": "val"' in line]


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
    # The cause, picked out of the workers' output, and where the rest of it is.
    (log,) = (tmp_path / "w").glob("train-workers-*.log")
    assert "RuntimeError: injected failure on rank 1" in result.stderr and str(log) in result.stderr
    assert result.stderr.count("Traceback") == 0
    assert processes_tagged(marker) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_any_end_of_the_launcher_ends_torchrun_and_every_worker(coco, tmp_path, sig):
    # SIGINT is Ctrl-C, SIGHUP a closed terminal or ssh session, SIGKILL the OOM killer or `kill -9`: this last one
    # recnext cannot pass on, so torchrun learns of it from the kernel and the workers from their vanished parent.
    marker = uuid.uuid4().hex
    env = {**os.environ, "RECNEXT_JOB_MARKER": marker}
    work_dir = tmp_path / "w"
    job = subprocess.Popen([sys.executable, "-m", "recnext_cli", "train", "tiny", "--config", str(TINY),
                            "--device", "cpu", "--gpus", "2", "--data-root", str(coco), "--work-dir", str(work_dir)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Wait until the workers have joined the job and started mmdet's logger, then stop the launcher.
    while not any("distributed: True" in p.read_text() for p in work_dir.glob("*.log")):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-4000:] if job.stderr else ""
        time.sleep(0.2)
    assert len(processes_tagged(marker)) >= 4  # recnext, torchrun and two workers
    job.send_signal(sig)
    stopped = time.monotonic()
    returncode = job.wait(timeout=30)
    assert returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
    while processes_tagged(marker) and time.monotonic() - stopped < 30:
        time.sleep(0.2)
    assert processes_tagged(marker) == []
