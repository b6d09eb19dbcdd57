"""Builds and runs the worker command line for `recnext test` / `recnext train`: torchrun, srun, or one process."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable

from recnext_cli import errors
from recnext_cli.errors import DatasetLayoutError, EnvironmentProblem, RecnextError, UsageError

LAUNCHERS = ("pytorch", "slurm", "none")
DEVICES = ("cuda", "cpu")
RUNNER_MODULES = {"test": "recnext_cli.runners.test", "train": "recnext_cli.runners.train"}
# torchrun's own default; multi-node jobs need one port every node agrees on, so nothing is picked at random there.
DEFAULT_MASTER_PORT = 29500
# The launcher hands every worker a private folder of this run through this variable: workers leave their one-line
# errors there (RUN_ERROR_GLOB) and rank 0 the test metrics (RUN_RESULT), for the launcher to read.
RUN_DIR_ENV = "RECNEXT_RUN_DIR"
RUN_ERROR_GLOB = "error-rank*.json"
RUN_RESULT = "result.json"
# The process a launcher starts gets this signal when the launcher dies, even by SIGKILL: torchrun and srun both
# stop their workers on SIGTERM. (Linux prctl option PR_SET_PDEATHSIG.)
PR_SET_PDEATHSIG = 1
# torchrun gives its workers 30 s to stop after SIGTERM before it kills them; wait a little longer than that.
STOP_GRACE_S = 45.0

# Annotation file and image folder of each COCO 2017 split, relative to the dataset root (the upstream layout).
COCO_SPLITS = {
    "train2017": ("annotations/instances_train2017.json", "train2017"),
    "val2017": ("annotations/instances_val2017.json", "val2017"),
}
SPLITS_FOR = {"test": ("val2017",), "train": ("train2017", "val2017")}


@dataclasses.dataclass(frozen=True)
class Topology:
    """How many workers run where, and how they find each other."""

    launcher: str
    nproc_per_node: int
    device: str | None  # None until the GPUs of this machine have been counted
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    partition: str | None = None
    srun_args: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """A command line and the environment variables it needs on top of the caller's environment."""

    argv: tuple[str, ...]
    env: dict[str, str]

    def shell(self) -> str:
        """The plan as one copy-pasteable shell line: `VAR=value … python …`."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join(assignments + [shlex.join(self.argv)])


def default_launcher(workers: int) -> str:
    return "pytorch" if workers > 1 else "none"


def visible_gpus() -> int:
    try:
        import torch
    except ImportError as exc:
        raise EnvironmentProblem(f"cannot import torch in {sys.executable} ({exc}); run `recnext setup`") from None
    return torch.cuda.device_count()


def parse_srun_args(text: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise UsageError(f"--srun-args {text!r}: {exc}; quote the srun arguments as a shell would") from None


def resolve_device(requested: str | None, gpus_visible: int, launcher: str) -> str:
    """`cuda` when a GPU is visible and nothing was asked for; refuse `cuda` on a machine without one.

    Under Slurm the workers run on the allocated nodes, not here: `cuda` is the default and is not checked locally.
    """
    if requested is not None and requested not in DEVICES:
        raise UsageError(f"--device {requested!r} is not one of {', '.join(DEVICES)}")
    if launcher == "slurm":
        return requested or "cuda"
    if requested is None:
        return "cuda" if gpus_visible else "cpu"
    if requested == "cuda" and not gpus_visible:
        raise UsageError("--device cuda, but torch sees no CUDA GPU here; use --device cpu for CPU workers")
    return requested


def check_options(topology: Topology) -> None:
    """Refuse worker counts and launcher settings that cannot work anywhere (no GPU count needed, no torch import)."""
    unit = {"cuda": "GPUs", "cpu": "CPU worker processes", None: "GPUs, or CPU worker processes with --device cpu"}
    if topology.device not in (*DEVICES, None):
        raise UsageError(f"--device {topology.device!r} is not one of {', '.join(DEVICES)}")
    if topology.launcher not in LAUNCHERS:
        raise UsageError(f"--launcher {topology.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if topology.nproc_per_node < 1:
        raise UsageError(f"--gpus {topology.nproc_per_node}: need at least 1 ({unit[topology.device]} per node)")
    if topology.nnodes < 1:
        raise UsageError(f"--nnodes {topology.nnodes}: need at least 1")
    if not 0 <= topology.node_rank < topology.nnodes:
        raise UsageError(
            f"--node-rank {topology.node_rank} is outside 0..{topology.nnodes - 1} (--nnodes {topology.nnodes})"
        )
    if topology.master_port is not None and not 1 <= topology.master_port <= 65535:
        raise UsageError(f"--master-port {topology.master_port} is not a TCP port (1-65535)")
    if topology.launcher == "none" and topology.world_size > 1:
        raise UsageError(
            f"--launcher none runs one process, but --gpus {topology.nproc_per_node} x --nnodes {topology.nnodes} "
            "asks for more; use --launcher pytorch or slurm"
        )
    if topology.launcher == "pytorch" and topology.nnodes > 1 and not topology.master_addr:
        raise UsageError("--nnodes > 1 needs --master-addr: the address of node 0, the same on every node")


def check_topology(topology: Topology, gpus_visible: int) -> None:
    """Refuse worker counts and launcher settings that cannot work, on this machine, before anything starts."""
    check_options(topology)
    # Under Slurm the workers land on other machines: the GPUs of the one launching the job say nothing.
    if topology.device == "cuda" and topology.launcher != "slurm" and topology.nproc_per_node > gpus_visible:
        raise UsageError(
            f"--gpus {topology.nproc_per_node}, but only {gpus_visible} GPU(s) are visible on this node "
            "(check CUDA_VISIBLE_DEVICES, or use --device cpu for CPU workers)"
        )


def _worker_env(topology: Topology) -> dict[str, str]:
    env: dict[str, str] = {}
    if topology.device == "cpu":
        # Hiding the GPUs keeps every CUDA branch in mmcv/mmdet (DataParallel, result collection) on the CPU path.
        env["CUDA_VISIBLE_DEVICES"] = ""
        if "OMP_NUM_THREADS" not in os.environ:
            # Share the cores between the CPU workers instead of each one starting a thread per core.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // topology.nproc_per_node))
    return env


def build_plan(runner: str, runner_args: list[str], topology: Topology, python: str = sys.executable) -> LaunchPlan:
    """The command line that starts `topology.world_size` workers of `recnext_cli.runners.<runner>`."""
    if runner not in RUNNER_MODULES:
        raise ValueError(f"unknown runner {runner!r}")
    worker = ["-m", RUNNER_MODULES[runner], *runner_args, "--launcher", topology.launcher]
    env = _worker_env(topology)
    if topology.launcher == "none":
        return LaunchPlan((python, *worker), env)
    if topology.launcher == "pytorch":
        torchrun = [
            python, "-m", "torch.distributed.run",
            "--nnodes", str(topology.nnodes), "--node-rank", str(topology.node_rank),
            "--nproc-per-node", str(topology.nproc_per_node),
        ]
        if topology.nnodes == 1 and topology.master_port is None:
            # torchrun binds its rendezvous store to a port of the kernel's choosing and hands that very socket's
            # port to the workers: no free-port probe that another process could take before torchrun binds it.
            torchrun.append("--standalone")
        else:
            torchrun += [
                "--master-addr", topology.master_addr or "127.0.0.1",
                "--master-port", str(topology.master_port or DEFAULT_MASTER_PORT),
            ]
        return LaunchPlan((*torchrun, *worker), env)
    srun = ["srun"]
    if topology.partition:
        srun += ["--partition", topology.partition]
    srun += [
        "--job-name", f"recnext-{runner}",
        "--nodes", str(topology.nnodes),
        "--ntasks", str(topology.world_size),
        "--ntasks-per-node", str(topology.nproc_per_node),
    ]
    if topology.device == "cuda":
        srun += [f"--gres=gpu:{topology.nproc_per_node}"]
    # One task failing ends the whole step, as torchrun does on a single node.
    srun += ["--kill-on-bad-exit=1", *topology.srun_args]
    # The workers derive MASTER_ADDR/PORT from Slurm's variables unless the user fixed them.
    if topology.master_addr:
        env["MASTER_ADDR"] = topology.master_addr
    if topology.master_port is not None:
        env["MASTER_PORT"] = str(topology.master_port)
    return LaunchPlan((*srun, python, "-u", *worker), env)


def coco_layout_problems(data_root: Path, splits: tuple[str, ...]) -> list[str]:
    """The files and folders of the COCO layout that `data_root` lacks, relative to it (empty when complete)."""
    missing = []
    for split in splits:
        annotations, images = COCO_SPLITS[split]
        if not (data_root / annotations).is_file():
            missing.append(annotations)
        if not (data_root / images).is_dir():
            missing.append(images + "/")
    return missing


def expected_tree(data_root: Path, splits: tuple[str, ...]) -> str:
    entries = [COCO_SPLITS[s][0] for s in splits] + [COCO_SPLITS[s][1] + "/" for s in splits]
    return f"{data_root}/{{{', '.join(entries)}}}"


def check_coco_layout(data_root: Path, splits: tuple[str, ...]) -> None:
    missing = coco_layout_problems(data_root, splits)
    if missing:
        raise DatasetLayoutError(
            f"{data_root} is not a COCO 2017 dataset: missing {', '.join(missing)}; expected "
            f"{expected_tree(data_root, splits)} (point --data-root at the folder holding annotations/)"
        )


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process (Linux /proc; empty elsewhere)."""
    table = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields follow the parenthesised command name, which may itself hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int) -> dict[int, int]:
    """Every live process below `pid`, as pid -> start time (a pid with another start time is a different process)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child][1]
            todo.append(child)
    return found


def _kill_survivors(processes: dict[int, int]) -> None:
    """SIGKILL those of `processes` that still run (same pid and same start time)."""
    table = _process_table()
    for pid, started in processes.items():
        if table.get(pid, (None, None))[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen) -> bool:
    if not hasattr(os, "waitid"):  # macOS
        return proc.poll() is not None
    # WNOWAIT leaves the child a zombie, so its pid (our process group id) cannot be reused while we clean up.
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _die_with_launcher():
    """A preexec_fn tying the started process to this one: it gets SIGTERM when we die, SIGKILL included (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only makes one system call
    launcher_pid = os.getpid()

    def set_up() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher_pid:  # we died between the fork and the prctl
            os._exit(128 + signal.SIGTERM)

    return set_up


def job_error(run_dir: Path) -> RecnextError | None:
    """The first one-line error a worker of the run reported, as the RecnextError subclass it was raised as."""
    reports = []
    for path in run_dir.glob(RUN_ERROR_GLOB):
        try:
            reports.append((path.stat().st_mtime_ns, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    if not reports:
        return None
    _, report = min(reports, key=lambda item: item[0])
    kind = getattr(errors, str(report.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, RecnextError)):
        kind = RecnextError
    return kind(str(report.get("message")))


def run(plan: LaunchPlan, run_dir: Path | None = None, grace_s: float = STOP_GRACE_S, *,
        output: IO | None = None, on_poll: Callable[[], None] | None = None) -> int:
    """Run the plan in its own process group and return its exit status (128 + N when signal N stopped it).

    Ctrl-C, SIGTERM or SIGHUP asks the launcher to stop its workers (torchrun and srun both pass SIGTERM on); a
    second signal, or `grace_s` without an exit, kills them. torchrun starts each worker in a session of its own, out
    of reach of the group: every process seen below the launcher after a stop request is killed if it outlives it.
    If this process is killed outright, the launcher gets SIGTERM from the kernel, and the workers watch their parent.

    With `run_dir`, the workers report RecnextErrors there: the first report ends the whole job at once, before
    torchrun prints a failure summary, and is raised here, so a job fails with one line whatever its size.
    `output` (a file) takes the job's stdout and stderr instead of this terminal; `on_poll` runs at every poll.
    """
    env = {**os.environ, **plan.env}
    if run_dir is not None:
        env[RUN_DIR_ENV] = str(run_dir)
    try:
        redirect = {"stdout": output, "stderr": subprocess.STDOUT} if output is not None else {}
        proc = subprocess.Popen(plan.argv, env=env, start_new_session=True, preexec_fn=_die_with_launcher(),
                                **redirect)
    except FileNotFoundError:
        hint = "; --launcher slurm needs a machine where Slurm's srun works" if plan.argv[0] == "srun" else ""
        raise EnvironmentProblem(f"cannot start the job: {plan.argv[0]} is not on PATH{hint}") from None
    stop_requests: list[int] = []
    stopping: dict[int, int] = {}

    def force_stop() -> None:
        stopping.update(descendants(proc.pid))
        _killpg(proc.pid, signal.SIGKILL)
        _kill_survivors(stopping)

    def request_stop(signum, _frame) -> None:
        stop_requests.append(signum)
        if len(stop_requests) == 1:
            stopping.update(descendants(proc.pid))
            _killpg(proc.pid, signal.SIGTERM)
        else:
            force_stop()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, request_stop) for sig in handled}
    error = None
    try:
        first_request = None
        while not _exited(proc):
            if run_dir is not None and (error := job_error(run_dir)):
                force_stop()
                break
            if stop_requests:
                first_request = first_request or time.monotonic()
                stopping.update(descendants(proc.pid))
                if time.monotonic() - first_request > grace_s:
                    force_stop()
            if on_poll is not None:
                on_poll()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not _exited(proc):
            force_stop()
        # What is left in the group (data loader workers of a `none` run, say) or below goes with the job.
        _killpg(proc.pid, signal.SIGKILL)
        _kill_survivors(stopping)
        returncode = proc.wait()
    if stop_requests:
        return 128 + stop_requests[0]
    error = error or (job_error(run_dir) if run_dir is not None else None)
    if error is not None:
        raise error
    return 128 - returncode if returncode < 0 else returncode


def require_runner_stack() -> None:
    """Fail early, in the launching process, when the workers could not import torch/mmcv/mmdet or load safely."""
    import importlib.metadata
    import importlib.util

    from packaging.version import InvalidVersion, Version

    from recnext_cli.compat.checkpoint import MIN_SAFE_TORCH

    missing = [name for name in ("torch", "mmcv", "mmdet") if importlib.util.find_spec(name) is None]
    if missing:
        raise EnvironmentProblem(f"{' and '.join(missing)} not installed in {sys.executable}; run `recnext setup`")
    try:
        torch_version = Version(importlib.metadata.version("torch"))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return  # a source build without metadata: the workers' own check still refuses an old torch
    if torch_version < Version(MIN_SAFE_TORCH):
        raise EnvironmentProblem(
            f"torch {torch_version} in {sys.executable} cannot load checkpoints safely (weights-only loading needs "
            f"torch >= {MIN_SAFE_TORCH}); run `recnext setup` to install the pinned torch"
        )
