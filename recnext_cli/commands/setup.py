"""`recnext setup`: install torch, mmcv (Python package, or a cached compiled build) and mmdet into this environment."""

from __future__ import annotations

import time

import typer


def setup(
    compile_ops: bool = typer.Option(
        False, "--compile-ops", help="Compile mmcv-full's own C++ kernels (about 10 minutes on 2 cores, cached per "
        "torch/CUDA/Python), with CUDA kernels when nvcc and a GPU are present. Needed only for mmcv ops other than "
        "RoIAlign and NMS (deformable conv, focal loss, ...); without it recnext runs those two on torchvision's "
        "CPU and CUDA kernels and installs mmcv's Python package in seconds."
    ),
    force_rebuild: bool = typer.Option(False, "--force-rebuild", help="Ignore the cached mmcv wheel and build again."),
    jobs: int = typer.Option(0, "--jobs", "-j", help="Parallel compile jobs for --compile-ops (default: all cores).",
                             min=0),
) -> None:
    """Install the pinned stack (torch, torchvision, mmcv 1.7.2, mmdet 2.28.2) into this environment.

    By default nothing is compiled: mmcv's Python package is installed, and RoIAlign and NMS, the only compiled ops
    Mask R-CNN uses, come from torchvision (a one-line .pth file makes plain mmdet code find them too). Built wheels
    are cached, so running setup again on the same machine takes seconds. Nothing outside this environment and the
    cache is touched.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from recnext_cli import stack

    console = Console(log_path=False)
    options = stack.SetupOptions(compile_ops=compile_ops, force_rebuild=force_rebuild)
    if jobs:
        options.jobs = jobs
    started = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("checking the installed stack", total=None)

        def report(message: str) -> None:
            console.log(message)
            progress.update(task, description=message)

        result = stack.setup_stack(options, report)
    for step in result.steps:
        console.print(f"[green]✓[/] {step}")
    console.print(f"stack ready in {time.monotonic() - started:.0f}s; full log: {result.log_path}")
