"""What a test or training job needs before it starts (checked names, files, dataset, checkpoint, topology) and
how it runs: torchrun / srun / one process, with rank 0's progress shown and the workers' output kept in a log."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import typer

# NAME becomes a folder under work_dirs/: no separators, no "..", nothing a shell or a file system reads specially.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,63}")


def checked_name(name: str) -> str:
    """NAME, once it is safe as a folder name: it becomes work_dirs/NAME, which must stay inside work_dirs/."""
    from recnext_cli.errors import UsageError

    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"model name {name!r}: use a zoo name (m3, a4, ...) or, with --config, a label of letters, digits, "
            "'.', '_', '+' and '-' (at most 64, not starting with '.' or '-'); it names the folder work_dirs/NAME"
        )
    return name


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How a test or training job's workers start, as given (--gpus, --device, --launcher, ...); None: the default."""

    gpus: int = 1  # workers per node
    device: str | None = None
    launcher: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    partition: str | None = None
    srun_args: str = ""


def launch_options(options: LaunchOptions):
    """The launcher options as a launch.Topology, checked as far as they can be without counting GPUs (no torch)."""
    from recnext_cli import launch

    topology = launch.Topology(
        launcher=options.launcher or launch.default_launcher(options.gpus * options.nnodes),
        nproc_per_node=options.gpus,
        device=options.device,
        nnodes=options.nnodes,
        node_rank=options.node_rank,
        master_addr=options.master_addr,
        master_port=options.master_port,
        partition=options.partition,
        srun_args=launch.parse_srun_args(options.srun_args),
    )
    launch.check_options(topology)
    return topology


def on_this_machine(topology, dry_run: bool):
    """`topology` with its device settled against this machine's GPUs, once the worker stack is known to be here."""
    from recnext_cli.launch import plan

    if not dry_run:
        plan.require_runner_stack()
    # Counting GPUs imports torch: only a run on this machine's GPUs needs it.
    launcher = topology.launcher
    gpus_visible = 0 if topology.device == "cpu" or launcher == "slurm" else plan.visible_gpus()
    topology = dataclasses.replace(topology, device=plan.resolve_device(topology.device, gpus_visible, launcher))
    plan.check_topology(topology, gpus_visible)
    return topology


def run_or_show(runner: str, runner_args: list[str], topology, notes: list[str], dry_run: bool,
                run_dir: Path | None = None, *, verbose: bool = True, log_path: Path | None = None) -> None:
    """Print the plan for --dry-run; otherwise run it (workers report to `run_dir`) and exit with its failed status.

    Unless `verbose`, the workers' own output goes to `log_path` and rank 0's progress events are shown instead.
    """
    from rich.console import Console
    from rich.markup import escape

    from recnext_cli import launch

    plan = launch.build_plan(runner, runner_args, topology)
    console = Console(stderr=True, highlight=False)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if dry_run:
        # The command goes to stdout unwrapped and unstyled, so it can be copied or captured as it is.
        typer.echo(plan.shell())
        return
    console.print(
        f"starting {topology.world_size} {topology.device} worker(s) with launcher {topology.launcher}", soft_wrap=True
    )
    started = time.monotonic()
    quiet = not verbose and run_dir is not None and log_path is not None
    if quiet:
        status = run_quietly(plan, run_dir, log_path, console)
    else:
        status = launch.run(plan, run_dir)
    if status != 0:
        console.print(f"[bold red]{runner} job failed[/] (exit {status}) after {time.monotonic() - started:.0f}s")
        if quiet:
            show_log_tail(log_path, console)
        raise typer.Exit(status)
    console.print(f"{runner} job finished in {time.monotonic() - started:.0f}s")


def run_quietly(plan, run_dir: Path, log_path: Path, console) -> int:
    """Run `plan` with the workers' output in `log_path` and their progress on the console; the exit status."""
    import sys

    from recnext_cli import launch
    from recnext_cli.progress import ProgressView

    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"worker output (mmdet's log lines, warnings): {log_path}", soft_wrap=True)
    view = ProgressView(run_dir, stream=sys.stderr)
    with log_path.open("a", encoding="utf-8") as log:
        try:
            return launch.run(plan, run_dir, output=log, on_poll=view.poll)
        finally:
            view.close()


def show_log_tail(log_path: Path, console, lines: int = 15) -> None:
    """Why the workers failed, from their output: the first traceback's exception line, else the last lines."""
    from rich.markup import escape

    try:
        text = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    cause = first_exception(text)
    shown = [cause] if cause else text[-lines:]
    if shown:
        console.print(f"{'cause' if cause else f'last {len(shown)} lines'} (whole output: {log_path}):",
                      soft_wrap=True)
        for line in shown:
            console.print(f"  {escape(line)}", soft_wrap=True)


RANK_PREFIX = re.compile(r"^\[(?:default)?rank\d+\]: ?")  # how torch may tag a worker's lines


def first_exception(lines: list[str]) -> str | None:
    """The exception line ("RuntimeError: …") that ends the first Python traceback in `lines`: the first failure."""
    lines = [RANK_PREFIX.sub("", line) for line in lines]
    for start, line in enumerate(lines):
        if line.strip().startswith("Traceback (most recent call last):"):
            for candidate in lines[start + 1:]:
                body = candidate.strip()
                if body and not candidate[:1].isspace() and not body.startswith(("File ", "^", "~")):
                    return body
    return None


def worker_log(directory: Path, runner: str) -> Path:
    """Where a quiet run keeps its workers' output: DIRECTORY/RUNNER-workers-YYYYmmdd-HHMMSS.log."""
    return directory / f"{runner}-workers-{time.strftime('%Y%m%d-%H%M%S')}.log"


def checked_dataset(data_root: Path, runner: str, dry_run: bool, notes: list[str]) -> Path:
    """`data_root`, absolute, once it has the COCO files `runner` reads; with --dry-run a note says what it lacks."""
    from recnext_cli import datasets

    data_root = data_root.resolve()
    splits = datasets.SPLITS_FOR[runner]
    if not dry_run:
        datasets.check_coco_layout(data_root, splits)
    elif missing := datasets.coco_layout_problems(data_root, splits):
        notes.append(f"dataset incomplete, the run would stop here: {data_root} lacks {', '.join(missing)}")
    return data_root


def existing_file(path: Path, option: str, dry_run: bool, notes: list[str]) -> Path:
    """`path`, absolute; a missing file stops the launch (or, with --dry-run, gets a note)."""
    from recnext_cli.errors import UsageError

    path = path.resolve()
    if not path.is_file():
        if not dry_run:
            raise UsageError(f"{option} {path} does not exist")
        notes.append(f"{option} {path} does not exist yet")
    return path



def fetched(checkpoint, dry_run: bool, notes: list[str]) -> Path:
    """The verified cached path of a zoo file, downloaded first if needed; with --dry-run only where it would be."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from recnext_cli import fetch

    if dry_run:
        state = fetch.cached_state(checkpoint)
        if state.status != fetch.VERIFIED:
            notes.append(
                f"{checkpoint.file_name} is {state.status} in the cache: the run first downloads and verifies "
                f"{fetch.download_url(checkpoint)} into {state.path}"
            )
        return state.path
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(checkpoint.file_name, total=None)
        return fetch.ensure_file(checkpoint, lambda done, total: progress.update(task, completed=done, total=total))


def model_files(name: str, config: Path | None, checkpoint: Path | None, dry_run: bool, notes: list[str]):
    """(config, checkpoint) for NAME before any download: the checkpoint is your file, or the zoo record to fetch.

    Checks the cheapest and most specific things first: the name against the zoo, then that your files exist.
    """
    from recnext_cli import zoo
    from recnext_cli.errors import UnknownModelError, UsageError

    checked_name(name)
    if checkpoint is None:
        try:
            checkpoint = zoo.get_checkpoint(name)
        except UnknownModelError as exc:
            if config is None:
                raise
            raise UsageError(f"{exc}; a --config outside the zoo also needs --checkpoint") from None
    elif config is None:
        zoo.config_path(name)  # an unknown name says so before any file is looked at
    config = existing_file(config, "--config", dry_run, notes) if config else zoo.config_path(name)
    if isinstance(checkpoint, Path):
        checkpoint = existing_file(checkpoint, "--checkpoint", dry_run, notes)
    return config, checkpoint


def pretrain_files(name: str, config: Path | None, dry_run: bool, notes: list[str]):
    """(config, zoo pretrain record or None) for training NAME: the zoo's, or your config with the zoo pretrain when
    NAME is in the zoo. Checks the name before your config file, and downloads nothing."""
    from recnext_cli import zoo
    from recnext_cli.errors import UnknownModelError

    checked_name(name)
    try:
        record = zoo.get_checkpoint(name, pretrain=True)
    except UnknownModelError:
        if config is None:
            raise
        record = None
    if config:
        config = existing_file(config, "--config", dry_run, notes)
        if record is None:
            notes.append(f"{name!r} is not in the zoo: the backbone starts from what {config.name} itself says")
    return config or zoo.config_path(name), record


def local_checkpoint(checkpoint, dry_run: bool, notes: list[str]) -> Path:
    """The path of `checkpoint` (from model_files): yours as it is, a zoo record's once downloaded and verified."""
    return checkpoint if isinstance(checkpoint, Path) else fetched(checkpoint, dry_run, notes).resolve()
