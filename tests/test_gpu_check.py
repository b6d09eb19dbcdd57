"""The GPU check's CPU rehearsal (benchmarks/gpu_check.sh --device cpu): every step runs here, its report says what it
found, and a deadline or a signal stops it cleanly with the report written."""

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

pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["install", "doctor", "ops", "train", "test", "bench"]


def start(tmp_path: Path, *args: str, marker: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHON": sys.executable, "RECNEXT_JOB_MARKER": marker}
    return subprocess.Popen(["bash", str(SCRIPT), "--device", "cpu", "--out", str(tmp_path / "out"), "--work",
                             str(tmp_path / "work"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def processes_tagged(marker: str) -> list[int]:
    needle = f"RECNEXT_JOB_MARKER={marker}".encode()
    tagged = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    tagged.append(int(entry.name))
        except OSError:
            continue
    return tagged


def test_the_rehearsal_runs_every_step_and_reports_it(tmp_path):
    import importlib.metadata

    # A budget far above the rehearsal's 2 CPU minutes: other jobs on the machine must not make it "incomplete".
    job = start(tmp_path, "--budget", "1500")
    output, _ = job.communicate(timeout=1800)
    found = report(tmp_path)
    assert job.returncode == 0, (output[-3000:], [(s["name"], s["status"], s["summary"]) for s in found["steps"]])
    steps = {step["name"]: step for step in found["steps"]}
    assert list(steps) == STEPS
    assert found["verdict"] == "pass"

    # recnext ran from the throwaway folder, beside this environment's own torch, whose version is recorded.
    environment = found["environment"]
    assert environment["packages"]["torch"] == importlib.metadata.version("torch")
    assert environment["locations"]["recnext_cli"].startswith(str(tmp_path / "work" / "site"))
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    assert set(steps["install"]["installed_wheels"]) | {w.split(" ")[0] for w in steps["install"]["skipped_wheels"]} \
        == {wheel.name for wheel in wheels}

    doctor = {row["name"]: row for row in steps["doctor"]["checks"]}
    assert doctor["mmcv ops provider"]["value"].startswith("torchvision kernels")

    ops = steps["ops"]
    assert set(ops["paths"]) == {"provider", "router over a CPU-only stand-in"}
    for cases in ops["paths"].values():
        assert {case["op"] for case in cases} == {"roi_align", "nms", "batched_nms"}
        assert all(case["ok"] for case in cases)
    # Every call of the router reached the stand-in for the compiled kernels on the CPU, forward and backward.
    assert {tuple(call) for call in ops["stand_in_calls"]} == {
        ("roi_align_forward", "cpu"), ("roi_align_backward", "cpu"), ("nms", "cpu")}

    train = steps["train"]
    assert train["log_records"] == train["iterations_expected"] == 4
    assert train["loss_first"] > 0 and train["loss_last"] > 0
    test = steps["test"]
    assert set(test["metrics"]) == {"cpu"} and {"bbox_mAP", "segm_mAP"} <= set(test["metrics"]["cpu"])
    assert test["ap_differences"] == {"bbox_mAP": 0.0, "segm_mAP": 0.0}

    bench = steps["bench"]
    timed = {(row["model"], row["part"], row["variant"]) for row in bench["rows"]}
    assert timed == {("m3", part, variant) for part in ("backbone", "detector") for variant in ("eager", "fast path")}
    for row in bench["rows"]:
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        if row["variant"] == "fast path":
            assert row["outputs"]["verdict"] == "equal", row
    detector = next(r["outputs"] for r in bench["rows"] if (r["part"], r["variant"]) == ("detector", "fast path"))
    assert detector["detections"] > 0 and detector["min_mask_iou"] >= 0.99
    assert bench["skipped_variants"] == ["fp16: CUDA only", "CUDA graphs: CUDA only"]
    # The CLI itself ran once on the device, with its default fast path.
    (cli,) = bench["cli"]
    assert cli["model"] == "m3" and 0 < cli["p10_ms"] <= cli["median_ms"] <= cli["p90_ms"]
    assert "BatchNorm folded" in cli["fast_path"]

    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert text.startswith("# recnext GPU check: PASS")
    assert "| m3 | detector | fast path |" in text and "| router over a CPU-only stand-in | nms |" in text
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert all(f"===== {label}:" in log for label in ("install", "doctor", "ops", "train", "test-cpu"))
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log",
                                                                          "gpu_check.md"]


def test_the_deadline_stops_a_running_step_and_starts_no_other(tmp_path):
    marker = uuid.uuid4().hex
    job = start(tmp_path, "--steps", "doctor,ops", "--budget", "6", marker=marker)
    job.communicate(timeout=300)
    found = report(tmp_path)
    assert job.returncode == 3  # incomplete
    assert found["verdict"] == "incomplete"
    assert [(step["name"], step["status"]) for step in found["steps"]] == [
        ("install", "pass"), ("doctor", "stopped"), ("ops", "not started")]
    assert found["steps"][1]["seconds"] < 6 + 10 + 5  # the budget, the stop's grace, some slack
    assert processes_tagged(marker) == []
    assert "===== doctor: " in (tmp_path / "out" / "gpu_check.log").read_text()


def test_sigterm_stops_the_check_and_leaves_the_report(tmp_path):
    marker = uuid.uuid4().hex
    job = start(tmp_path, "--steps", "doctor", marker=marker)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "gpu_check.json").exists() or len(report(tmp_path)["steps"]) < 1:
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)  # into the doctor step
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM
    found = report(tmp_path)
    assert [(step["name"], step["status"]) for step in found["steps"]] == [("install", "pass"), ("doctor", "stopped")]
    assert "SIGTERM" in found["steps"][1]["summary"]
    assert processes_tagged(marker) == []
