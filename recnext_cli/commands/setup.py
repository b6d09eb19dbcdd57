"""`recnext setup`: install torch, a cached mmcv-full build and mmdet into this Python environment."""

from __future__ import annotations

import time

import typer


def setup(
    cuda_ops: bool = typer.Option(
        False, "--cuda-ops", help="Also compile mmcv's CUDA kernels for the local GPU (needs nvcc). "
        "Without it, Mask R-CNN still runs on GPUs: recnext routes RoIAlign/NMS to torchvision's CUDA kernels."
    ),
    force_rebuild: bool = typer.Option(False, "--force-rebuild", help="Ignore the cached mmcv-full wheel and compile again."),
    jobs: int = typer.Option(0, "--jobs", "-j", help="Parallel compile jobs (default: all cores).", min=0),
) -> None:
    """Install the pinned stack (torch, torchvision, mmcv-full built from source, mmdet) into this environment.

    The mmcv-full wheel is compiled once per mmcv/torch/CUDA/Python combination and cached, so running
    setup again on the same machine takes seconds. Nothing outside this environment and the cache is touched.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from recnext_cli import stack

    console = Console(log_path=False)
    options = stack.SetupOptions(cuda_ops=cuda_ops, force_rebuild=force_rebuild)
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
