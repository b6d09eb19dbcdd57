"""The options and arguments `recnext test`, `train`, `config`, `infer`, `bench` and `demo` share, and the parsing
they need."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand


def expand_variadic(args: list[str], names: tuple[str, ...]) -> list[str]:
    """`--eval bbox segm` -> `--eval bbox --eval segm`: every bare word after one of `names` repeats that option."""
    expanded, current = [], None
    for index, token in enumerate(args):
        if token == "--":
            return expanded + args[index:]
        if token in names:
            current = token
            expanded.append(token)
            continue
        if token.startswith("-"):
            current = None
        elif current and expanded[-1] != current:
            expanded.append(current)
        expanded.append(token)
    return expanded


# --device of `recnext test`, `train`, `infer` and `bench latency`.
class Device(str, enum.Enum):
    """Where a command runs the model: the values of --device, in the order its help lists them."""

    cuda = "cuda"
    cpu = "cpu"


def parse_device(value: str | Device) -> Device:
    """--device's value as a Device; any other value is recnext's one-line usage error (exit 2), as the launcher's
    checks are, rather than Typer's boxed usage message."""
    from recnext_cli.errors import UsageError

    try:
        return Device(value)
    except ValueError:
        raise UsageError(f"--device {value!r} is not one of {', '.join(device.value for device in Device)}") from None


def device_name(device: Device | None) -> str | None:
    """The plain string the pipeline takes ("cuda", "cpu"), or None for "choose from this machine's GPUs"."""
    return None if device is None else device.value


DeviceOption = Annotated[Optional[Device], typer.Option(
    "--device", parser=parse_device, help="cuda or cpu (default: cuda when a GPU is visible)", show_default=False,
)]


class VariadicCommand(TyperCommand):
    """Lets --eval and --cfg-options take several values, as mmdet's tools do; click options take one value each."""

    variadic = ("--eval", "--cfg-options", "--eval-options")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_variadic(args, self.variadic))


# Options `recnext test` and `train` share (`config` and `demo` some of them).
Gpus = Annotated[int, typer.Option(
    "--gpus", help="Workers per node: GPUs, or with --device cpu the number of CPU worker processes (gloo).",
)]


DataRoot = Annotated[Path, typer.Option("--data-root", help="COCO 2017 root: holds annotations/, train2017/, val2017/.")]
Launcher = Annotated[Optional[str], typer.Option(
    "--launcher", help="pytorch (torchrun), slurm (srun) or none (one plain process) "
    "(default: pytorch for several workers, none for one)", show_default=False,
)]
Nnodes = Annotated[int, typer.Option("--nnodes", help="Machines taking part (torchrun: run the command on each).")]
NodeRank = Annotated[int, typer.Option("--node-rank", help="This machine's index among --nnodes (torchrun).")]
MasterAddr = Annotated[Optional[str], typer.Option(
    "--master-addr", help="Address of node 0 (default: 127.0.0.1 on one node; Slurm: its first node)",
    show_default=False,
)]
MasterPort = Annotated[Optional[int], typer.Option(
    "--master-port", help="Port on node 0, 1-65535 (default on one node: torchrun binds one the kernel picks; "
    "across nodes: 29500; Slurm: derived from the job id)", show_default=False,
)]
Partition = Annotated[Optional[str], typer.Option("--partition", help="Slurm partition (srun --partition).")]
SrunArgs = Annotated[str, typer.Option(
    "--srun-args", help='More srun arguments, e.g. "--time 2:00:00 --cpus-per-task 8".',
)]
CfgOptions = Annotated[Optional[list[str]], typer.Option(
    "--cfg-options", help="Config overrides KEY=VALUE ..., as mmdet's tools take them.", show_default=False,
)]
Config = Annotated[Optional[Path], typer.Option(
    "--config", help="Run this mmdet config instead of the zoo model's (NAME then only labels the results).",
    show_default=False,
)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the command and environment, start nothing.")]
BatchPolicy = Annotated[str, typer.Option(
    "--batch-policy", help="How to keep the recipe's images per optimizer step (16 for the published runs) with "
    "your worker count: accumulate (sum the gradients of several iterations per step; the count must divide "
    "it), linear-lr (one step per iteration, lr x actual/recipe batch, mmdet's auto_scale_lr) or as-configured.",
)]
# Shared by `recnext test`, `train` and `infer`.
ModelName = Annotated[str, typer.Argument(
    help="Zoo model (m3, m4, m5, a3, a4, a5), or with --config a label of letters, digits, '.', '_', '+', '-'.",
)]
DetectorCheckpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Detector weights (default: the zoo checkpoint, downloaded and verified into the cache)",
    show_default=False,
)]


Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show the workers' own output (mmdet's log lines) live instead of progress bars.",
)]
