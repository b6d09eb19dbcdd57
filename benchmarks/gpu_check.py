"""The prepared GPU check: recnext beside a machine's own torch, then doctor, ops, train/test and bench in one report.

Run on a lent GPU machine (README, "GPU check"):  bash benchmarks/gpu_check.sh --out $OUT
Rehearse on the CPU here:                         PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --out DIR
Fill .whl/ with what the GPU machine lacks:       make gpu-wheels

`run` installs recnext and the wheels in .whl/ into a throwaway folder (pip --target, no index, no dependencies), so
the machine's own torch stays as it is, whatever its version; every later step runs as subprocesses with that
folder on PYTHONPATH, against one deadline, and is stopped cleanly when it would overrun it:
  1. `recnext doctor --json`;
  2. RoIAlign / nms / batched_nms on the device against the CPU (the provider, and the router a CPU-only compiled
     mmcv would get);
  3. `recnext train` (torchrun, one worker) for a few dozen iterations on the synthetic shapes set, then
     `recnext test` of that checkpoint on the device and on the CPU, whose APs must agree;
  4. `recnext bench latency` of M3 and A3, backbone and detector, eager / fast path / fp16 / CUDA graphs, with
     each variant's outputs compared to eager (built by `recnext_cli.bench.build_runner`, as the command builds them).
gpu_check.json, gpu_check.md and gpu_check.log are rewritten in --out after every step, so a run killed from outside
still leaves what it found.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
# What the lent GPU machine's image lacks of what recnext, mmcv and mmdet import (the device tool's KINDS.md lists
# its packages), carried as wheels at the versions `make setup` installs here; mmcv's is built by `stack`.
CARRIED = ("addict==2.4.0", "yapf==0.43.0", "terminaltables==3.1.10", "platformdirs==4.14.8", "pycocotools==2.0.11",
           "faster-coco-eval==1.8.0")
WHEEL_PYTHON = "3.12"  # the GPU machine's Python (/opt/torch/.venv)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
WHEELS_LIMIT_MIB = 32  # the device tool carries at most 64 MiB, working tree included
TREE_LIMIT_MIB = 64

INSTALL_GOAL_S = 120
CHECK_BUDGET_S = 360
STOP_GRACE_S = 10  # after SIGTERM, before SIGKILL: recnext's launcher passes SIGTERM on to torchrun's workers
MIN_START_S = 5  # a command with less time than this left is not started
RUN_NAME = "gpu-check"
DEMO_CONFIG = Path("recnext_cli", "configs", "demo", "mask_rcnn_recnext_m0_shapes.py")
SAMPLES_PER_GPU = 2  # the demo config's
PARTS = ("backbone", "detector")
STEPS = ("doctor", "ops", "train", "test", "bench")

# Tolerances. Ops: as tests/test_ops_provider.py holds the provider to mmcv-full's kernels (1e-5), scaled by the
# largest CPU value where that is over 1: the GPU kernels add RoIAlign's gradients with atomics in another order than
# the CPU's loop, and float32 sums differ by a few units in the last place of the sum (seen on an H100: gradients up
# to 12.2 differ by 1.5e-5, a relative 1.2e-6).
ROI_ALIGN_TOLERANCE = 1e-5
# Test: GPU against CPU APs of the same checkpoint, in the README's points (mmdet's mAP x 100). The briefly trained
# model's masks have many pixels near mmdet's 0.5 threshold, and any other order of float sums flips some of them:
# on an H100 its mask AP differed from the CPU's by 0.22 in one run and by 0.07 (TF32 off) or 0.00 (TF32 on) in
# another, while box AP agreed within 0.06 every time.
AP_TOLERANCE = {"bbox_mAP": 0.1, "segm_mAP": 0.5}
# Bench: backbone features, max |diff| / max |eager|; fp32 as recnext_cli.fastpath promises, fp16 from its rounding.
FP32_RELATIVE = 1e-4
FP16_RELATIVE = 1e-2
# Detector outputs after matching each detection to the nearest eager one of its class; the classifier weight scale
# that gives a randomly initialised detector boxes to compare (about 100 at 256x256, with scores 0.1-0.25).
CLASSIFIER_SCALE = 20.0
DETECTOR_TOLERANCE = {"fp32": {"box_px": 0.05, "score": 1e-3, "mask_iou": 0.99},
                      "fp16": {"box_px": 2.0, "score": 2e-2, "mask_iou": 0.9}}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each step does: full on a GPU, just enough to run every code path in the CPU rehearsal."""

    train_images: int
    val_images: int
    epochs: int
    bench_models: tuple[str, ...]
    bench_input: str
    warmup: int
    iters: int


SIZES = {
    # 96 images, one worker of 2 images: 48 iterations an epoch.
    "cuda": Sizes(train_images=96, val_images=48, epochs=2, bench_models=("m3", "a3"), bench_input="512x512",
                  warmup=10, iters=50),
    # The driver does the same for every model: one is enough to rehearse it. 64x64, not 32x32: on torch 2.11 the
    # CPU fast path's oneDNN conv+add fails on the 1x1 maps that 32x32 leaves ("could not create a memory").
    "cpu": Sizes(train_images=8, val_images=4, epochs=1, bench_models=("m3",), bench_input="64x64", warmup=1,
                 iters=2),
}

# Each latency variant: the BenchConfig fields that `recnext bench latency`'s flags set (--no-fused, --dtype fp16,
# --compile), given to its own model builder.
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"fused": False},
    "fast path": {},
    "fp16": {"dtype": "fp16"},
    "CUDA graphs": {"compile": True},
}
CUDA_ONLY_VARIANTS = ("fp16", "CUDA graphs")
# The rehearsal's timings only show that timing works; one thread keeps two of them (pytest-xdist) from slowing each
# other down many times over, as oneDNN's threads spin while they wait for a core.
CPU_THREADS = {"cuda": [], "cpu": ["--threads", "1"]}


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the driver: stop the running command, write the report, exit."""


class DeadlineReached(Exception):
    """Too little of the budget is left to start another command."""


@dataclasses.dataclass
class Outcome:
    returncode: int | None  # None: stopped at its time limit
    stdout: str
    stderr: str
    seconds: float
    limit_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 8) -> str:
        return "\n".join((self.stderr or self.stdout).strip().splitlines()[-lines:])


class Check:
    """One run of the check: where things go, the deadline, the commands run, and the report as it grows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = args.device
        self.sizes = SIZES[args.device]
        self.out = args.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = args.work.resolve()
        self.site = self.work / "site"
        self.wheels = args.wheels.resolve()
        self.install_budget = args.install_budget
        self.budget = args.budget
        self.steps = args.steps
        self.started = time.monotonic()
        self.deadline = self.started + args.install_budget  # until the install is done
        self.log_path = self.out / "gpu_check.log"
        self.log_path.write_text("")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (str(self.site), os.environ.get("PYTHONPATH")))),
            "PYTHONUNBUFFERED": "1",
            "RECNEXT_HOME": str(self.work / "home"),
            "RECNEXT_OFFLINE": "1",  # nothing here may need the network: the GPU machine has none
            "MPLBACKEND": "Agg",
            # The CLI's compiled bench and the output probe share inductor's cache, so each graph compiles once.
            "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor"),
        }
        self.report: dict[str, Any] = {
            "check": "recnext GPU check",
            "device_requested": args.device,
            "host": socket.gethostname(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "goals_s": {"install": INSTALL_GOAL_S, "checks": CHECK_BUDGET_S},
            "budgets_s": {"install": args.install_budget, "checks": args.budget},
            "sizes": dataclasses.asdict(self.sizes),
            "environment": {},
            "steps": [],
        }

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def start_checks(self) -> None:
        self.deadline = time.monotonic() + self.budget

    def command(self, label: str, argv: list[str], cap_s: float) -> Outcome:
        """Run `argv` for at most `cap_s` seconds and never past the deadline; its output goes to the log."""
        timeout = min(cap_s, self.remaining())
        if timeout < MIN_START_S:
            raise DeadlineReached(label)
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out_path, err_path = logs / f"{label}.out", logs / f"{label}.err"
        started = time.monotonic()
        with open(out_path, "w") as stdout, open(err_path, "w") as stderr:
            # A session of its own, so that stopping it reaches everything it started (recnext, torchrun, probes);
            # torchrun's workers, in sessions of their own, die with their parent (recnext_cli.runners).
            proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=self.env, cwd=self.work,
                                    start_new_session=True)
            try:
                returncode: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                returncode = None
            except Interrupted:
                stop_process_group(proc)
                self._log(label, argv, None, time.monotonic() - started, out_path, err_path)
                raise
        seconds = time.monotonic() - started
        self._log(label, argv, returncode, seconds, out_path, err_path)
        return Outcome(returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"), seconds,
                       timeout)

    def _log(self, label, argv, returncode, seconds, out_path: Path, err_path: Path) -> None:
        ending = "stopped at its time limit" if returncode is None else f"exit {returncode}"
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {label}: {' '.join(map(str, argv))}\n===== {ending} after {seconds:.1f} s\n")
            for name, path in (("stdout", out_path), ("stderr", err_path)):
                text = path.read_text(errors="replace")
                if text.strip():
                    log.write(f"--- {name}\n{text.rstrip()}\n")

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def recnext(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "recnext_cli", *args]

    def record(self, step: dict[str, Any]) -> None:
        self.report["steps"].append(step)
        self.save()
        # The device tool returns the end of the output even when its files do not come back.
        print(f"[{time.monotonic() - self.started:4.0f} s] {step['name']}: {step['status']}: {step['summary']}",
              flush=True)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.report["verdict"] = verdict(self.report["steps"])
        write_atomically(self.out / "gpu_check.json", json.dumps(self.report, indent=2) + "\n")
        write_atomically(self.out / "gpu_check.md", markdown(self.report))


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.part")
    staging.write_text(text)
    os.replace(staging, path)


def verdict(steps: list[dict[str, Any]]) -> str:
    statuses = {step["status"] for step in steps}
    if "fail" in statuses:
        return "fail"
    if statuses & {"stopped", "not started"}:
        return "incomplete"
    return "pass"


def step_result(name: str, status: str, seconds: float, summary: str, **detail: Any) -> dict[str, Any]:
    return {"name": name, "status": status, "seconds": round(seconds, 1), "summary": summary, **detail}


def stopped(name: str, started: float, outcome: Outcome | None = None, **detail: Any) -> dict[str, Any]:
    """A step stopped at its command's time limit (its own, or what was left of the budget), or never started."""
    if outcome is None:
        return step_result(name, "not started", 0, "not started: the check's budget was spent", **detail)
    return step_result(name, "stopped", time.monotonic() - started,
                       f"stopped after {outcome.limit_s:.0f} s, its limit or what was left of the budget", **detail)


def failed(name: str, started: float, what: str, outcome: Outcome | None = None, **detail: Any) -> dict[str, Any]:
    if outcome is not None and outcome.tail():
        detail["output_tail"] = outcome.tail()
    return step_result(name, "fail", time.monotonic() - started, what, **detail)


# ----------------------------------------------------------------------------------------------------------- install

def wheel_fits(path: Path) -> bool:
    """Whether this interpreter can install the wheel at `path` (its tags against the interpreter's)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    return any(tag in supported for tag in parse_wheel_filename(path.name)[3])


def copy_sources(target: Path) -> Path:
    """The files that make the recnext package, copied: pip builds in the source folder, which stays untouched."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copytree(REPO / "recnext_cli", target / "recnext_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, target / name)
    return target


ENVIRONMENT_PROBE = """
import importlib, importlib.metadata as metadata, json, os, platform, sys
facts = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
for dist in ("torch", "torchvision", "numpy", "mmcv", "mmdet", "pycocotools", "faster-coco-eval", "recnext"):
    try:
        facts["packages"][dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        facts["packages"][dist] = None
facts["locations"] = {}
for module in ("recnext_cli", "mmcv", "mmdet", "pycocotools", "torch"):
    try:
        facts["locations"][module] = importlib.import_module(module).__file__
    except Exception as exc:
        facts["locations"][module] = f"import failed: {type(exc).__name__}: {exc}"
import torch
facts["torch_cuda"] = torch.version.cuda
facts["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0))) if facts["gpus"] else None
facts["cpu_count"] = os.cpu_count()
print(json.dumps(facts))
"""


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    proc = subprocess.run(query, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or proc.stderr.strip()


def step_install(check: Check) -> dict[str, Any]:
    started = time.monotonic()
    wheels = sorted(check.wheels.glob("*.whl")) if check.wheels.is_dir() else []
    fitting = [wheel for wheel in wheels if wheel_fits(wheel)]
    names = [wheel.name.split("-")[0].lower() for wheel in fitting]
    twice = sorted({name for name in names if names.count(name) > 1})
    detail: dict[str, Any] = {
        "wheels_dir": str(check.wheels),
        "installed_wheels": [wheel.name for wheel in fitting],
        "skipped_wheels": [f"{wheel.name} (not for this Python)" for wheel in wheels if wheel not in fitting],
        "site": str(check.site),
    }
    if twice:
        return failed("install", started, f"two versions of {', '.join(twice)} in {check.wheels}: keep one "
                      "(`make gpu-wheels` rewrites the folder)", **detail)
    source = copy_sources(check.work / "src")
    shutil.rmtree(check.site, ignore_errors=True)
    pip = check.python("-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--no-build-isolation", "--disable-pip-version-check",
                       "--target", str(check.site), *map(str, fitting), str(source))
    installed = check.command("install", pip, check.install_budget)
    if installed.returncode is None:
        return stopped("install", started, installed, **detail)
    if not installed.ok:
        return failed("install", started, "pip could not install recnext and the carried wheels", installed, **detail)
    probe = check.command("environment", check.python("-c", ENVIRONMENT_PROBE), 120)
    if not probe.ok:
        return failed("install", started, "torch, mmcv or mmdet does not import beside the installed folder", probe,
                      **detail)
    facts = json.loads(probe.stdout.strip().splitlines()[-1])
    facts["nvidia_smi"] = nvidia_smi()
    check.report["environment"] = facts
    seconds = time.monotonic() - started
    # recnext always comes from the folder; mmcv and mmdet too where their wheels were carried.
    carried = ["recnext_cli"] + [module for module in ("mmcv", "mmdet") if module in names]
    outside = [module for module in carried if not str(facts["locations"][module]).startswith(str(check.site))]
    if outside:
        return failed("install", started, f"{', '.join(outside)} imported from outside {check.site}", **detail)
    packages = facts["packages"]
    summary = (f"{len(fitting)} wheels + recnext in {seconds:.0f} s (goal {INSTALL_GOAL_S} s); torch "
               f"{packages['torch']}, torchvision {packages['torchvision']}, mmcv {packages['mmcv']}, mmdet "
               f"{packages['mmdet']}")
    if check.device == "cuda" and not facts["gpus"]:
        return failed("install", started, f"{summary}; but torch sees no CUDA GPU", **detail)
    status = "pass" if seconds <= INSTALL_GOAL_S else "warn"
    return step_result("install", status, seconds, summary, **detail)


# ------------------------------------------------------------------------------------------------------------ doctor

def step_doctor(check: Check) -> dict[str, Any]:
    started = time.monotonic()
    outcome = check.command("doctor", check.recnext("doctor", "--json"), 180)
    if outcome.returncode is None:
        return stopped("doctor", started, outcome)
    try:
        answer = json.loads(outcome.stdout)  # a recnext.doctor document: usable, checks
    except json.JSONDecodeError:
        return failed("doctor", started, f"`recnext doctor --json` printed no JSON (exit {outcome.returncode})",
                      outcome)
    rows = {row["name"]: row for row in answer["checks"]}
    fixed = [row["name"] for row in answer["checks"] if row["status"] == "fixed in-process"]
    broken = [f"{row['name']}: {row['value']}" for row in answer["checks"] if row["status"] == "broken"]
    provider = rows.get("mmcv ops provider", {}).get("value", "?")
    gpus = rows.get("GPUs", {}).get("value", "?")
    summary = f"usable: {answer['usable']}; ops: {provider}; GPUs: {gpus}; fixed in-process: {len(fixed)}"
    status = "pass" if answer["usable"] and outcome.ok else "fail"
    return step_result("doctor", status, time.monotonic() - started, summary, fixed=fixed, broken=broken,
                       checks=answer["checks"])


# --------------------------------------------------------------------------------------------------------------- ops

def step_ops(check: Check) -> dict[str, Any]:
    started = time.monotonic()
    outcome = check.command("ops", check.python(str(THIS), "probe-ops", "--device", check.device), 180)
    if outcome.returncode is None:
        return stopped("ops", started, outcome)
    if not outcome.ok:
        return failed("ops", started, "the ops probe crashed", outcome)
    answer = json.loads(outcome.stdout.strip().splitlines()[-1])
    cases = [case for path in answer["paths"].values() for case in path]
    bad = [f"{case['path']}: {case['op']} {case['case']}" for case in cases if not case["ok"]]
    published = [f"{op}: {problem}" for op, problem in answer["published"].items() if problem]
    leaked = [call for call in answer.get("stand_in_calls", []) if call[1] != "cpu"]
    if leaked:
        bad.append(f"the router sent {', '.join(f'{name} on {device}' for name, device in leaked)} to the "
                   "compiled kernels")
    roi = [case for case in cases if case["op"] == "roi_align"]
    worst = max((case["max_abs"] for case in roi), default=0.0)
    # The largest difference as a share of its bound: at most 1 passes.
    share = max((max(case["forward_max_abs"] / case["forward_bound"], case["backward_max_abs"] / case["backward_bound"])
                 for case in roi), default=0.0)
    same_kept = all(case["ok"] for case in cases if case["op"] != "roi_align")
    summary = (f"{len(cases)} cases on {check.device} vs cpu through {', '.join(answer['paths'])}; RoIAlign max "
               f"|diff| {worst:.1e}, at most {share:.2f} of its bound ({ROI_ALIGN_TOLERANCE:.0e} x max(1, max |cpu|)); "
               f"NMS kept indices {'identical' if same_kept else 'DIFFER'}")
    status = "fail" if bad or published else "pass"
    return step_result("ops", status, time.monotonic() - started, summary, problems=bad + published, **answer)


def _cpu_only_kernels():
    """A stand-in for mmcv-full compiled without CUDA kernels: CPU calls compute, other devices fail as mmcv's do."""
    from recnext_cli.compat import mmcv_ext

    class CpuOnlyKernels:
        def __init__(self) -> None:
            self.calls: set[tuple[str, str]] = set()

        def __getattr__(self, name):
            def kernel(first, *args, **kwargs):
                self.calls.add((name, first.device.type))
                if first.device.type != "cpu":
                    raise RuntimeError(f"{name}_impl: implementation for device {first.device} not found.")
                return getattr(mmcv_ext, name)(first, *args, **kwargs)

            return kernel

    return CpuOnlyKernels()


def _random_boxes(count: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand((count, 2), generator=generator) * 400
    boxes = torch.cat([corner, corner + 4 + torch.rand((count, 2), generator=generator) * 96], 1)
    # Distinct scores: with ties the order of equal boxes, and so what NMS keeps, is each kernel's own choice.
    scores = (torch.randperm(count, generator=generator).float() + 1) / count
    classes = torch.randint(0, 20, (count,), generator=generator)
    return boxes, scores, classes


def compare_ops(device: str, path: str) -> list[dict[str, Any]]:
    """RoIAlign forward/backward, nms and batched_nms on `device` against the CPU, through mmcv.ops' entry points."""
    import torch
    from mmcv.ops import RoIAlign, batched_nms, nms, roi_align

    cases = []
    generator = torch.Generator().manual_seed(0)
    features = torch.rand((2, 16, 48, 64), generator=generator)
    count = 256
    corner = torch.rand((count, 2), generator=generator) * torch.tensor([256.0, 192.0])
    size = 1 + torch.rand((count, 2), generator=generator) * 96
    batch_index = torch.randint(0, 2, (count, 1), generator=generator).float()
    rois = torch.cat([batch_index, corner, corner + size], 1)  # image coordinates, features at stride 4
    upstream = torch.rand((count, 16, 7, 7), generator=generator)
    roi_calls = {
        f"function, sampling {ratio}, aligned {aligned}":
            (lambda x, r, ratio=ratio, aligned=aligned: roi_align(x, r, (7, 7), 0.25, ratio, "avg", aligned))
        for ratio in (0, 2) for aligned in (True, False)
    }
    roi_calls["RoIAlign class, sampling 2, aligned True"] = RoIAlign((7, 7), 0.25, 2)
    for label, call in roi_calls.items():
        answers = []
        for where in ("cpu", device):
            # A fresh leaf each time: features.to("cpu") would be `features` itself, and its gradient would add up.
            x = features.to(where, copy=True).requires_grad_(True)
            out = call(x, rois.to(where))
            out.backward(upstream.to(where))
            answers.append((out.detach().cpu(), x.grad.cpu()))
        (out_cpu, grad_cpu), (out_dev, grad_dev) = answers
        forward = (out_cpu - out_dev).abs().max().item()
        backward = (grad_cpu - grad_dev).abs().max().item()
        bounds = [ROI_ALIGN_TOLERANCE * max(1.0, reference.abs().max().item()) for reference in (out_cpu, grad_cpu)]
        cases.append({"path": path, "op": "roi_align", "case": f"{count} rois, {label}", "forward_max_abs": forward,
                      "backward_max_abs": backward, "max_abs": max(forward, backward),
                      "forward_bound": bounds[0], "backward_bound": bounds[1],
                      "ok": forward <= bounds[0] and backward <= bounds[1]})
    nms_calls = {
        ("nms", "3000 boxes, IoU 0.5"): (3000, lambda b, s, c: nms(b, s, 0.5)[1]),
        ("nms", "3000 boxes, IoU 0.7"): (3000, lambda b, s, c: nms(b, s, 0.7)[1]),
        ("nms", "500 boxes, IoU 0.5, offset 1"): (500, lambda b, s, c: nms(b, s, 0.5, offset=1)[1]),
        ("batched_nms", "3000 boxes, 20 classes"): (3000, lambda b, s, c: batched_nms(b, s, c, {"iou_threshold": 0.5})[1]),
        ("batched_nms", "3000 boxes, class-agnostic"):
            (3000, lambda b, s, c: batched_nms(b, s, c, {"iou_threshold": 0.5}, class_agnostic=True)[1]),
        # Over mmcv's split_thr (10000): one NMS per class instead of the coordinate-offset trick.
        ("batched_nms", "12000 boxes, 20 classes, split path"):
            (12000, lambda b, s, c: batched_nms(b, s, c, {"iou_threshold": 0.5})[1]),
    }
    for seed, ((op, label), (count, call)) in enumerate(nms_calls.items()):
        boxes, scores, classes = _random_boxes(count, seed)
        kept = [call(boxes.to(where), scores.to(where), classes.to(where)).cpu() for where in ("cpu", device)]
        cases.append({"path": path, "op": op, "case": label, "kept": len(kept[0]),
                      "ok": torch.equal(kept[0], kept[1])})
    return cases


def probe_ops(device: str) -> dict[str, Any]:
    """The provider, or the compiled kernels, on `device` against the CPU; where no compiled mmcv exists, also the
    router a CPU-only compiled build gets (recnext_cli.compat.ops), with a stand-in for that build's kernels."""
    from recnext_cli import compat  # registers recnext's mmcv._ext provider where no compiled one exists
    from recnext_cli.compat import ext_hook, ops, ops_check

    import mmcv.ops  # noqa: F401

    answer: dict[str, Any] = {"provider": ext_hook.active_provider(), "published": ops_check.published_answers()}
    if ops.compiled_ext() is None:
        answer["paths"] = {"provider": compare_ops(device, "provider")}
        stand_in = _cpu_only_kernels()
        for name in ops.ROUTED:
            importlib.import_module(name).ext_module = stand_in
        ops.patch()
        path = "router over a CPU-only stand-in"
        answer["paths"][path] = compare_ops(device, path)
        answer["stand_in_calls"] = sorted(stand_in.calls)
    elif ops.mmcv_has_cuda_ops():
        answer["paths"] = {"compiled kernels": compare_ops(device, "compiled kernels")}
    else:
        compat.apply_all()
        path = "router over compiled CPU kernels"
        answer["paths"] = {path: compare_ops(device, path)}
    return answer


# ------------------------------------------------------------------------------------------------------ train / test

def step_train(check: Check) -> dict[str, Any]:
    started = time.monotonic()
    sizes = check.sizes
    data = check.work / "data"
    made = check.command("synthetic", check.python(
        "-m", "recnext_cli.synthetic", str(data), "--train-images", str(sizes.train_images),
        "--val-images", str(sizes.val_images), "--overwrite"), 120)
    if made.returncode is None:
        return stopped("train", started, made)
    if not made.ok:
        return failed("train", started, "the synthetic dataset could not be made", made)
    work_dir = check.work / "train"
    # torchrun with one worker: a process group (NCCL on a GPU), DDP and mmdet's distributed training path.
    outcome = check.command("train", check.recnext(
        # --verbose: the workers' own output (mmdet's log lines, any traceback) in this report's log.
        "train", RUN_NAME, "--verbose", "--config", str(check.site / DEMO_CONFIG), "--device", check.device,
        "--gpus", "1",
        "--launcher", "pytorch", "--data-root", str(data), "--work-dir", str(work_dir),
        "--cfg-options", f"runner.max_epochs={sizes.epochs}", "log_config.interval=1"), 300)
    expected = sizes.epochs * math.ceil(sizes.train_images / SAMPLES_PER_GPU)
    detail = {"launcher": "pytorch (torchrun, 1 worker)", "iterations_expected": expected}
    if outcome.returncode is None:
        return stopped("train", started, outcome, **detail)
    if not outcome.ok:
        return failed("train", started, f"`recnext train` failed (exit {outcome.returncode})", outcome, **detail)
    if not (work_dir / "latest.pth").exists():
        return failed("train", started, "training ended without a latest.pth", outcome, **detail)
    records = [json.loads(line) for path in work_dir.glob("*.log.json")
               for line in path.read_text().splitlines()[1:] if line.strip()]
    steps = [record for record in records if record.get("mode") == "train"]
    losses = [record["loss"] for record in steps]
    detail.update(
        log_records=len(steps),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        seconds_per_iteration=statistics.median(record["time"] for record in steps) if steps else None,
        memory_mb=max((record["memory"] for record in steps if "memory" in record), default=None),  # CUDA only
    )
    finite = bool(losses) and all(math.isfinite(loss) for loss in losses)
    summary = (f"{expected} iterations on {check.device} in {outcome.seconds:.0f} s; loss "
               f"{detail['loss_first']} -> {detail['loss_last']}")
    return step_result("train", "pass" if finite else "fail", time.monotonic() - started, summary, **detail)


def _test_run(check: Check, slug: str, device: str, flags: tuple[str, ...]) -> tuple[Outcome, dict[str, float] | None]:
    label = f"test-{slug}"
    result = check.work / f"{label}.json"
    outcome = check.command(label, check.recnext(
        "test", RUN_NAME, "--verbose", "--config", str(check.site / DEMO_CONFIG), "--checkpoint",
        str(check.work / "train" / "latest.pth"), "--device", device, "--gpus", "1", "--data-root",
        str(check.work / "data"), "--out", str(result), *flags), 240)
    metrics = json.loads(result.read_text())["metrics"] if outcome.ok and result.exists() else None
    return outcome, metrics


def step_test(check: Check, trained: bool) -> dict[str, Any]:
    started = time.monotonic()
    if not trained:
        status = "fail" if "train" in check.steps else "not started"
        return step_result("test", status, 0, "no checkpoint: the train step did not run or did not pass")
    runs: dict[str, dict[str, float] | None] = {}
    # One process (--launcher none): mmcv's MMDataParallel and its Scatter on the device.
    plan = [("cpu", "cpu", ())]  # the rehearsal's device is the CPU: one run serves both columns
    if check.device == "cuda":
        plan = [("cuda", "cuda", ()), ("fp16", "cuda", ("--fp16",)), *plan]
    for label, device, flags in plan:
        outcome, metrics = _test_run(check, label, device, flags)
        if outcome.returncode is None:
            return stopped("test", started, outcome, metrics=runs)
        if metrics is None:
            return failed("test", started, f"`recnext test --device {device} {' '.join(flags)}` failed", outcome,
                          metrics=runs)
        runs[label] = metrics
    device_metrics, cpu_metrics = runs[check.device], runs["cpu"]
    deltas = {key: 100 * abs(device_metrics[key] - cpu_metrics[key]) for key in AP_TOLERANCE}
    agree = all(deltas[key] <= limit for key, limit in AP_TOLERANCE.items())
    summary = (f"box AP {100 * device_metrics['bbox_mAP']:.2f} on {check.device} vs {100 * cpu_metrics['bbox_mAP']:.2f}"
               f" on cpu (tolerance {AP_TOLERANCE['bbox_mAP']}), mask AP {100 * device_metrics['segm_mAP']:.2f} vs "
               f"{100 * cpu_metrics['segm_mAP']:.2f} (tolerance {AP_TOLERANCE['segm_mAP']})")
    if "fp16" in runs:
        summary += f"; --fp16: box AP {100 * runs['fp16']['bbox_mAP']:.2f}, mask AP {100 * runs['fp16']['segm_mAP']:.2f}"
    return step_result("test", "pass" if agree else "fail", time.monotonic() - started, summary, metrics=runs,
                       ap_differences=deltas)


# ------------------------------------------------------------------------------------------------------------- bench

def step_bench(check: Check) -> dict[str, Any]:
    """One `recnext bench latency` run (the CLI on this device, its default fast path), then every variant of both
    parts timed in turns and compared with eager in one probe process per group: each process start imports torch
    and mmdet again, and timings taken in turns in one process give ratios that a busy machine does not skew."""
    started = time.monotonic()
    sizes = check.sizes
    skipped = [] if check.device == "cuda" else list(CUDA_ONLY_VARIANTS)
    variants = [name for name in VARIANTS if name not in skipped]
    fast = [name for name in variants if not VARIANTS[name].get("compile")]
    compiled = [name for name in variants if VARIANTS[name].get("compile")]
    # Cheapest first, so that a deadline takes the compiled variants, which take minutes, and nothing else.
    groups = [fast] + ([["eager", *compiled]] if compiled else [])
    rows: list[dict[str, Any]] = []
    problems, warnings, stopped_at, cli = [], [], None, None
    try:
        outcome = check.command("latency-cli", check.recnext(
            "bench", "latency", *sizes.bench_models, "--part", "backbone", "--device", check.device, "--input",
            sizes.bench_input, "--warmup", str(sizes.warmup), "--iters", str(sizes.iters), "--json",
            *CPU_THREADS[check.device]), 180)
        if outcome.returncode is None:
            stopped_at = "latency-cli"
        elif not outcome.ok:
            problems.append(f"recnext bench latency: exit {outcome.returncode}: {outcome.tail(3)}")
        else:
            document = json.loads(outcome.stdout)  # a recnext.bench document
            cli = [{key: row.get(key) for key in ("model", "median_ms", "p10_ms", "p90_ms", "fast_path", "gflops")}
                   for row in document["rows"]]
    except DeadlineReached:
        stopped_at = "latency-cli"
    for group in groups:
        label = "bench-" + "-".join(group).replace(" ", "_")
        argv = check.python(str(THIS), "probe-bench", "--parts", *PARTS, "--device", check.device, "--input",
                            sizes.bench_input, "--models", *sizes.bench_models, "--variants", *group, "--warmup",
                            str(sizes.warmup), "--iters", str(sizes.iters))
        try:
            outcome = check.command(label, argv, 420 if group is not fast else 240)
        except DeadlineReached:
            stopped_at = stopped_at or label
            continue
        if outcome.returncode is None:
            stopped_at = stopped_at or label
            continue
        if not outcome.ok:
            problems.append(f"{label}: exit {outcome.returncode}: {outcome.tail(3)}")
            continue
        for row in json.loads(outcome.stdout.strip().splitlines()[-1]):
            if row["variant"] == "eager" and group is not fast:
                continue  # the compiled group's own baseline: its ratio is in the compiled rows
            rows.append(row)
            comparison = row["outputs"]
            if comparison is None:
                continue
            where = f"{row['model']} {row['part']} {row['variant']}"
            if comparison["verdict"] == "differ":
                (warnings if row["variant"] == "fp16" else problems).append(
                    f"{where}: outputs differ from eager ({comparison['measure']})")
            elif comparison["verdict"] != "equal":
                warnings.append(f"{where}: {comparison['verdict']} ({comparison['measure']})")
    detail = {"input": sizes.bench_input, "warmup": sizes.warmup, "iters": sizes.iters, "rows": rows, "cli": cli,
              "skipped_variants": [f"{name}: CUDA only" for name in skipped], "problems": problems,
              "warnings": warnings}
    compared = sum(row["outputs"] is not None for row in rows)
    summary = (f"{len(rows)} timings of {', '.join(sizes.bench_models)} ({', '.join(variants)}), outputs compared for "
               f"{compared} variant(s); `recnext bench latency` {'ran' if cli else 'did not finish'}")
    if problems:
        return step_result("bench", "fail", time.monotonic() - started, summary + f"; {len(problems)} problem(s)",
                           **detail)
    if stopped_at:
        return step_result("bench", "stopped", time.monotonic() - started,
                           summary + f"; the deadline stopped it at {stopped_at}", **detail)
    return step_result("bench", "warn" if warnings else "pass", time.monotonic() - started, summary, **detail)


def _detached(outputs):
    """A copy of a model's outputs that the next call cannot overwrite (CUDA graphs reuse their output buffers)."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().cpu().clone()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_detached(item) for item in outputs)
    return copy.deepcopy(outputs)


def compare_features(reference, outputs, precision: str) -> dict[str, Any]:
    difference = max(((out - ref).abs().max() / ref.abs().max()).item() for out, ref in zip(outputs, reference))
    tolerance = FP16_RELATIVE if precision == "fp16" else FP32_RELATIVE
    return {"max_relative_difference": difference, "tolerance": tolerance,
            "measure": f"max |diff| / max |eager| {difference:.1e}, tolerance {tolerance:.0e}",
            "verdict": "equal" if difference <= tolerance else "differ"}


def _mask_iou(a, b) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def compare_detections(reference, outputs, precision: str) -> dict[str, Any]:
    """Boxes, scores and masks of one image: each detection of either side matched to the nearest one of its class
    on the other side. A detection without a match counts only when its score is clear of the cut (mmdet's score
    threshold or its max_per_img): right at the cut, a rounding difference may rightly keep one and drop the other.
    """
    import numpy as np

    limits = DETECTOR_TOLERANCE["fp16" if precision == "fp16" else "fp32"]
    (ref_boxes, ref_masks), (out_boxes, out_masks) = reference[0], outputs[0]
    scores = [boxes[:, 4] for boxes in (*ref_boxes, *out_boxes) if len(boxes)]
    cut = min(float(kept.min()) for kept in scores) if scores else 0.0
    box_px = score = 0.0
    mask_iou = 1.0
    at_cut = unmatched = 0
    sides = ((ref_boxes, ref_masks, out_boxes, out_masks), (out_boxes, out_masks, ref_boxes, ref_masks))
    for mine, my_masks, theirs, their_masks in sides:
        for label, (boxes, others) in enumerate(zip(mine, theirs)):
            for index, detection in enumerate(boxes):
                distances = np.abs(others[:, :4] - detection[:4]).max(axis=1) if len(others) else np.array([np.inf])
                nearest = int(distances.argmin())
                if distances[nearest] > limits["box_px"]:
                    if detection[4] <= cut + limits["score"]:
                        at_cut += 1
                    else:
                        unmatched += 1
                    continue
                box_px = max(box_px, float(distances[nearest]))
                score = max(score, float(abs(others[nearest, 4] - detection[4])))
                mask_iou = min(mask_iou, _mask_iou(my_masks[label][index], their_masks[label][nearest]))
    found = sum(len(boxes) for boxes in ref_boxes)
    within = unmatched == 0 and score <= limits["score"] and mask_iou >= limits["mask_iou"]
    return {"detections": found, "detections_variant": sum(len(boxes) for boxes in out_boxes),
            "unmatched": unmatched, "unmatched_at_cut": at_cut, "max_box_difference_px": box_px,
            "max_score_difference": score, "min_mask_iou": mask_iou, "tolerance": limits,
            "verdict": ("equal" if within else "differ") if found else "nothing to compare",
            "measure": f"{found} detections, {unmatched} unmatched (+{at_cut} at the score cut), boxes within "
            f"{box_px:.2g} px, scores {score:.1e}, mask IoU >= {mask_iou:.3f}"}


def probe_bench(parts: list[str], device: str, input_size: str, models: list[str], variants: list[str],
                warmup: int, iters: int) -> list[dict[str, Any]]:
    """Each variant of each part and model built by `recnext bench latency`'s own builder with the settings its flags
    give, its outputs compared with the first variant's (eager) in strict fp32, then all of them timed in turns."""
    import torch

    from recnext_cli import bench
    from recnext_cli.bench import models as bench_models

    build_detector = bench_models.build_random_detector

    def detector_with_scores(name: str):
        # Random weights score every class alike, near 1/81, under mmdet's 0.05 threshold: no box would be left to
        # compare. A larger classifier weight spreads the scores, and the boxes and masks of the winners come out.
        detector = build_detector(name)
        with torch.no_grad():
            detector.roi_head.bbox_head.fc_cls.weight.mul_(CLASSIFIER_SCALE)
        return detector

    # Patched where build_runner looks it up: the module that defines it.
    bench_models.build_random_detector = detector_with_scores
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # as CPU_THREADS says
    default_tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    rows = []
    for part, model in ((part, model) for part in parts for model in models):
        base = bench.BenchConfig(part=part, device=device, input_size=bench.parse_input_size(input_size), warmup=0,
                                 iters=1)
        compare = compare_detections if part == "detector" else compare_features
        runners = {variant: bench.build_runner(model, dataclasses.replace(base, **VARIANTS[variant]), with_flops=False)
                   for variant in variants}
        outputs: dict[str, Any] = {}
        with torch.inference_mode():
            # The fp32 promise is about the rewrites, so outputs are compared in strict fp32: PyTorch's default TF32
            # convolutions on Ampere and later GPUs differ from fp32 by about 3e-4 relative on their own.
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            # One call each, before any warm-up: a CUDA-graph variant (torch.compile "reduce-overhead") compiles and
            # runs its code on its first call and records its graph on the second, which the warm-up below then does
            # with TF32 at its default, as users run it.
            for variant, runner in runners.items():
                answer = _detached(runner.run())
                reference = outputs.setdefault(variants[0], answer)
                if variant != variants[0]:
                    outputs[variant] = compare(reference, answer, VARIANTS[variant].get("dtype", "fp32"))
            # Timed as users run it.
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = default_tf32
            untimed = max(bench.untimed_calls(runner.fast_path, runner.device, warmup) for runner in runners.values())
            times = bench.time_in_turns({variant: runner.run for variant, runner in runners.items()}, warmup=untimed,
                                        rounds=iters, synchronize=synchronize)
        for variant, durations in times.items():
            stats = bench.latency_stats(durations)
            rows.append({"model": model, "part": part, "variant": variant, "median_ms": stats.median_ms,
                         "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms,
                         "speedup_vs_eager": bench.speedup_in_turns(times[variants[0]], durations),
                         "fast_path": runners[variant].fast_path.describe(),
                         "outputs": None if variant == variants[0] else outputs[variant]})
        del runners
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------------------ report

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    packages = env.get("packages", {})
    gpus = ", ".join(env.get("gpus") or []) or "no GPU"
    lines = [
        f"# recnext GPU check: {report['verdict'].upper()}",
        "",
        f"{report['date']} on {report['host']} ({gpus}; nvidia-smi: {env.get('nvidia_smi') or '-'}), "
        f"--device {report['device_requested']}. Python {env.get('python', '?')}, torch {packages.get('torch', '?')} "
        f"(CUDA {env.get('torch_cuda') or '-'}), torchvision {packages.get('torchvision', '?')}, numpy "
        f"{packages.get('numpy', '?')}, mmcv {packages.get('mmcv', '?')}, mmdet {packages.get('mmdet', '?')}. "
        f"{report.get('elapsed_s', 0):.0f} s in all (goals: install {report['goals_s']['install']} s, checks "
        f"{report['goals_s']['checks']} s).",
        "",
        "| step | status | seconds | summary |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['summary']} |" for s in report["steps"]]
    steps = {step["name"]: step for step in report["steps"]}
    problems = [(s["name"], p) for s in report["steps"] for p in s.get("problems", [])]
    problems += [(s["name"], s["output_tail"]) for s in report["steps"] if s.get("output_tail")]
    if problems:
        lines += ["", "## Problems", ""]
        lines += [f"- {name}: {text}".replace("\n", "\n  ") for name, text in problems]
    if "ops" in steps and "paths" in steps["ops"]:
        lines += ["", f"## RoIAlign / NMS on {report['device_requested']} against the CPU", "",
                  "| path | op | case | max abs diff (fwd / bwd; bound) or kept boxes | ok |", "|---|---|---|---|---|"]
        for path in steps["ops"]["paths"].values():
            for case in path:
                figure = (f"{case['forward_max_abs']:.1e} / {case['backward_max_abs']:.1e}; "
                          f"{case.get('forward_bound', ROI_ALIGN_TOLERANCE):.1e} / "
                          f"{case.get('backward_bound', ROI_ALIGN_TOLERANCE):.1e}" if case["op"] == "roi_align"
                          else f"{case['kept']} kept, identical: {case['ok']}")
                lines.append(f"| {case['path']} | {case['op']} | {case['case']} | {figure} | {case['ok']} |")
    if "test" in steps and steps["test"].get("metrics"):
        runs = steps["test"]["metrics"]
        keys = sorted({key for metrics in runs.values() for key in metrics})
        lines += ["", "## `recnext test` of the trained checkpoint (AP x 100)", "",
                  "| metric | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
        # COCOeval's -1: no object of that size in the set.
        lines += [f"| {key} | " + " | ".join(f"{100 * m[key]:.2f}" if m.get(key, -1) >= 0 else "-"
                                             for m in runs.values()) + " |" for key in keys]
    if "bench" in steps and steps["bench"].get("rows"):
        bench = steps["bench"]
        lines += ["", f"## Latency, {bench['input']}, batch 1, {bench['warmup']} warm-up + {bench['iters']} timed "
                  "rounds, variants in turns in one process (`recnext bench latency`'s builder)", "",
                  "| model | part | variant | median ms | p10 | p90 | vs eager | outputs vs eager |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for row in bench["rows"]:
            speedup = "-" if row["speedup_vs_eager"] is None else f"{row['speedup_vs_eager']:.2f}x"
            outputs = row["outputs"]
            compared = "reference" if row["variant"] == "eager" else (
                f"{outputs['verdict']}: {outputs['measure']}" if outputs else "not compared")
            lines.append(f"| {row['model']} | {row['part']} | {row['variant']} | {_ms(row['median_ms'])} | "
                         f"{_ms(row['p10_ms'])} | {_ms(row['p90_ms'])} | {speedup} | {compared} |")
        for row in bench.get("cli") or []:
            lines += ["", f"`recnext bench latency {row['model']} --part backbone` (its default fast path: "
                      f"{row['fast_path']}): median {_ms(row['median_ms'])} ms, p10 {_ms(row['p10_ms'])}, "
                      f"p90 {_ms(row['p90_ms'])}."]
        if bench["skipped_variants"]:
            lines += ["", "Skipped: " + "; ".join(bench["skipped_variants"]) + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> int:
    check = Check(args)

    def interrupt(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    current = "install"
    try:
        try:
            install = step_install(check)
        except DeadlineReached:
            install = stopped("install", check.started)
        check.record(install)
        check.start_checks()
        plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("doctor", lambda: step_doctor(check)),
            ("ops", lambda: step_ops(check)),
            ("train", lambda: step_train(check)),
            ("test", lambda: step_test(check, trained=_passed(check, "train"))),
            ("bench", lambda: step_bench(check)),
        ]
        for current, step in plan:
            if current not in check.steps:
                continue
            started = time.monotonic()
            # The doctor also runs where recnext installed but torch sees no GPU: it says what torch found.
            usable = install["status"] in ("pass", "warn") or (current == "doctor" and check.report["environment"])
            if not usable:
                check.record(step_result(current, "not started", 0, "the install did not pass"))
                continue
            try:
                check.record(step())
            except DeadlineReached:
                check.record(stopped(current, started))
    except Interrupted as exc:
        check.record(step_result(current, "stopped", 0, f"the check received {exc}; the report holds what it found"))
        return 128 + signal.Signals[str(exc)].value
    finally:
        check.save()
        print(f"verdict: {check.report['verdict']}; report: {check.out / 'gpu_check.md'}", flush=True)
        if not args.keep_work:
            shutil.rmtree(check.work, ignore_errors=True)
    return {"pass": 0, "incomplete": 3}.get(check.report["verdict"], 1)


def _passed(check: Check, name: str) -> bool:
    return any(step["name"] == name and step["status"] == "pass" for step in check.report["steps"])


# ------------------------------------------------------------------------------------------------------------ wheels

def mmcv_wheel() -> Path:
    """mmcv's pure-Python wheel from `recnext setup`'s cache, built there first when missing."""
    from recnext_cli import stack

    key = stack.build_key({}, compile_ops=False)
    cached = stack.cached_wheel(key)
    if cached is not None:
        return cached
    stack.log_dir().mkdir(parents=True, exist_ok=True)
    with open(stack.log_dir() / "gpu-wheels.log", "w") as log:
        return stack.build_mmcv_wheel(key, {}, stack.SetupOptions(), log, lambda line: print(line, file=sys.stderr))


def tree_mib() -> float | None:
    """What the device tool sends besides the carried folders: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True)
    if listed.returncode != 0:
        return None
    paths = [REPO / name for name in listed.stdout.decode().split("\0") if name]
    return sum(path.stat().st_size for path in paths if path.is_file()) / 2**20


def wheels(dest: Path) -> int:
    """Fill `dest` with exactly the wheels the check installs on the GPU machine (nothing else, one version each)."""
    from recnext_cli.stack import MMDET_VERSION

    specs = [f"mmdet=={MMDET_VERSION}", *CARRIED]
    staging = Path(tempfile.mkdtemp(prefix=".gpu-wheels-", dir=dest.parent))
    try:
        platforms = [argument for name in WHEEL_PLATFORMS for argument in ("--platform", name)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", WHEEL_PYTHON, "--implementation", "cp", *platforms, "-d", str(staging),
                        *specs], check=True)
        shutil.copy2(mmcv_wheel(), staging)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = sorted(dest.glob("*.whl"))
    size = sum(path.stat().st_size for path in files) / 2**20
    for path in files:
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    tree = tree_mib()
    print(f"{size:7.2f} MiB  in {dest} (limit {WHEELS_LIMIT_MIB} MiB); working tree "
          f"{'unknown' if tree is None else f'{tree:.2f} MiB'}; together under {TREE_LIMIT_MIB} MiB travel")
    if size > WHEELS_LIMIT_MIB or (tree is not None and size + tree > TREE_LIMIT_MIB):
        print("error: too large for the device tool: drop a wheel or shrink the tree", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("run", help="the check (what benchmarks/gpu_check.sh runs)")
    check.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, .md and .log")
    check.add_argument("--device", choices=tuple(SIZES), default="cuda",
                       help="cuda on the GPU machine; cpu rehearses every step here with small sizes")
    check.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (make gpu-wheels)")
    check.add_argument("--work", type=Path, help="throwaway folder: installed packages, dataset, checkpoints "
                       "(default: a new temporary folder, removed at the end)")
    check.add_argument("--install-budget", type=float, default=INSTALL_GOAL_S, metavar="S")
    check.add_argument("--budget", type=float, default=CHECK_BUDGET_S, metavar="S",
                       help="seconds for every step after the install; a step that would overrun is stopped")
    check.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    fill = commands.add_parser("wheels", help="download/build the carried wheels (make gpu-wheels)")
    fill.add_argument("--dest", type=Path, default=REPO / ".whl")
    ops = commands.add_parser("probe-ops", help="(internal) ops on a device against the CPU, as JSON")
    ops.add_argument("--device", required=True)
    probe = commands.add_parser("probe-bench", help="(internal) bench variants timed in turns and their outputs "
                                "compared with eager's, as JSON")
    probe.add_argument("--parts", nargs="+", choices=PARTS, required=True)
    probe.add_argument("--device", required=True)
    probe.add_argument("--input", required=True)
    probe.add_argument("--models", nargs="+", required=True)
    probe.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), required=True, help="the first is the baseline")
    probe.add_argument("--warmup", type=int, required=True)
    probe.add_argument("--iters", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        args.steps = [step.strip() for step in args.steps.split(",") if step.strip()]
        unknown = sorted(set(args.steps) - set(STEPS))
        if unknown:
            parser.error(f"--steps {','.join(unknown)}: choose from {','.join(STEPS)}")
        args.keep_work = args.work is not None
        args.work = args.work or Path(tempfile.mkdtemp(prefix="recnext-gpu-check-"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "wheels":
        return wheels(args.dest.resolve())
    if args.command == "probe-ops":
        answer = probe_ops(args.device)
    else:
        answer = probe_bench(args.parts, args.device, args.input, args.models, args.variants, args.warmup, args.iters)
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
