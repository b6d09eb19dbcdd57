"""Launch planning: the worker topology, its checks, and the torchrun / srun / one-process command line."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys

from recnext_cli.errors import EnvironmentProblem, UsageError

LAUNCHERS = ("pytorch", "slurm", "none")
DEVICES = ("cuda", "cpu")
RUNNER_MODULES = {"test": "recnext_cli.runners.test", "train": "recnext_cli.runners.train"}
# torchrun's own default; multi-node jobs need one port every node agrees on, so nothing is picked at random there.
DEFAULT_MASTER_PORT = 29500


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
