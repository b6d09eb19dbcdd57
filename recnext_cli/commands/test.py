"""`recnext test`: evaluate a zoo model (or your config and checkpoint) on COCO val2017 with N workers."""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

# What mmdet 2.28's CocoDataset.evaluate computes.
COCO_METRICS = ("bbox", "segm", "proposal", "proposal_fast")
# NAME becomes a folder under work_dirs/: no separators, no "..", nothing a shell or a file system reads specially.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,63}")
FP16_ON_CPU = ("--fp16 runs on CUDA only (mmcv's fp16 mode autocasts through torch.cuda.amp); "
               "drop --fp16 to test on the CPU")


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


class VariadicCommand(TyperCommand):
    """Lets --eval and --cfg-options take several values, as mmdet's tools do; click options take one value each."""

    variadic = ("--eval", "--cfg-options", "--eval-options")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_variadic(args, self.variadic))


# Options `recnext train` shares.
Gpus = Annotated[int, typer.Option(
    "--gpus", help="Workers per node: GPUs, or with --device cpu the number of CPU worker processes (gloo).",
)]
Device = Annotated[Optional[str], typer.Option(
    "--device", help="cuda or cpu (default: cuda when a GPU is visible)", show_default=False,
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
# Shared with `recnext train` and `recnext infer`.
ModelName = Annotated[str, typer.Argument(
    help="Zoo model (m3, m4, m5, a3, a4, a5), or with --config a label of letters, digits, '.', '_', '+', '-'.",
)]
DetectorCheckpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Detector weights (default: the zoo checkpoint, downloaded and verified into the cache)",
    show_default=False,
)]


def checked_name(name: str) -> str:
    """NAME, once it is safe as a folder name: it becomes work_dirs/NAME, which must stay inside work_dirs/."""
    from recnext_cli.errors import UsageError

    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"model name {name!r}: use a zoo name (m3, a4, ...) or, with --config, a label of letters, digits, "
            "'.', '_', '+' and '-' (at most 64, not starting with '.' or '-'); it names the folder work_dirs/NAME"
        )
    return name


def launch_options(gpus, device, launcher, nnodes, node_rank, master_addr, master_port, partition, srun_args):
    """The launcher options as a launch.Topology, checked as far as they can be without counting GPUs (no torch)."""
    from recnext_cli import launch

    topology = launch.Topology(
        launcher=launcher or launch.default_launcher(gpus * nnodes),
        nproc_per_node=gpus,
        device=device,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        partition=partition,
        srun_args=launch.parse_srun_args(srun_args),
    )
    launch.check_options(topology)
    return topology


def on_this_machine(topology, dry_run: bool):
    """`topology` with its device settled against this machine's GPUs, once the worker stack is known to be here."""
    from recnext_cli import launch

    if not dry_run:
        launch.require_runner_stack()
    # Counting GPUs imports torch: only a run on this machine's GPUs needs it.
    launcher = topology.launcher
    gpus_visible = 0 if topology.device == "cpu" or launcher == "slurm" else launch.visible_gpus()
    topology = dataclasses.replace(topology, device=launch.resolve_device(topology.device, gpus_visible, launcher))
    launch.check_topology(topology, gpus_visible)
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


Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show the workers' own output (mmdet's log lines) live instead of progress bars.",
)]


def checked_dataset(data_root: Path, runner: str, dry_run: bool, notes: list[str]) -> Path:
    """`data_root`, absolute, once it has the COCO files `runner` reads; with --dry-run a note says what it lacks."""
    from recnext_cli import launch

    data_root = data_root.resolve()
    splits = launch.SPLITS_FOR[runner]
    if not dry_run:
        launch.check_coco_layout(data_root, splits)
    elif missing := launch.coco_layout_problems(data_root, splits):
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


def local_checkpoint(checkpoint, dry_run: bool, notes: list[str]) -> Path:
    """The path of `checkpoint` (from model_files): yours as it is, a zoo record's once downloaded and verified."""
    return checkpoint if isinstance(checkpoint, Path) else fetched(checkpoint, dry_run, notes).resolve()


def test(
    name: ModelName,
    gpus: Gpus = 1,
    data_root: DataRoot = Path("data/coco"),
    checkpoint: DetectorCheckpoint = None,
    metrics: Annotated[Optional[list[str]], typer.Option(
        "--eval", help="COCO metrics: bbox segm (also proposal, proposal_fast).  [default: bbox segm]",
        show_default=False,
    )] = None,
    eval_options: Annotated[Optional[list[str]], typer.Option(
        "--eval-options", help="KEY=VALUE ... for mmdet's dataset.evaluate (or, with --format-only, format_results), "
        "as mmdet's tools/test.py takes them, e.g. classwise=True.", show_default=False,
    )] = None,
    format_only: Annotated[bool, typer.Option(
        "--format-only", help="Write the predictions as COCO results JSON files (PREFIX.bbox.json, PREFIX.segm.json) "
        "instead of evaluating, e.g. for test-dev submissions; PREFIX is --eval-options jsonfile_prefix=PREFIX "
        "(default: work_dirs/NAME/results).",
    )] = False,
    show_dir: Annotated[Optional[Path], typer.Option(
        "--show-dir", help="Also draw each test image with its detections (as `recnext infer` draws) into this "
        "folder, one PNG per image.", show_default=False,
    )] = None,
    show_score_thr: Annotated[Optional[float], typer.Option(
        "--show-score-thr", help="Lowest score drawn with --show-dir.  [default: 0.3]", show_default=False,
    )] = None,
    device: Device = None,
    nnodes: Nnodes = 1,
    node_rank: NodeRank = 0,
    master_addr: MasterAddr = None,
    master_port: MasterPort = None,
    launcher: Launcher = None,
    partition: Partition = None,
    srun_args: SrunArgs = "",
    cfg_options: CfgOptions = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Metrics JSON to write (default: work_dirs/NAME/test_result.json)", show_default=False,
    )] = None,
    dry_run: DryRun = False,
    config: Config = None,
    fuse_conv_bn: Annotated[bool, typer.Option(
        "--fuse-conv-bn", help="Fold every BatchNorm into a neighbouring conv before testing, as mmdet's tools/test.py "
        "does, for speed: a RecNeXt backbone through its own fuse (which folds more than mmcv's fuse_conv_bn), the "
        "rest with mmcv's. Metrics stay equal up to float rounding.",
    )] = False,
    fp16: Annotated[bool, typer.Option(
        "--fp16", help="Run the model in half precision the mmdet way (mmcv's wrap_fp16_model: autocast in the "
        "network, fp32 box decoding and NMS). CUDA only; metrics may differ slightly from fp32's.",
    )] = False,
    evaluator: Annotated[str, typer.Option(
        "--evaluator", help="COCO metric implementation: pycocotools (mmdet's own) or faster (faster-coco-eval's "
        "C++ COCOeval: the same metrics, evaluation nearly twice as fast; see benchmarks/coco_eval.py).",
    )] = "pycocotools",
    verbose: Verbose = False,
) -> None:
    """Evaluate NAME on COCO val2017 with --gpus workers (torchrun, Slurm or one process) and print its README row.

    Before any worker starts, the checkpoint is downloaded and verified and the dataset layout is checked.
    Put NAME first: --eval and --cfg-options take every word that follows them, as in mmdet's tools.
    """
    from recnext_cli.compat.evaluator import EVALUATORS
    from recnext_cli.errors import UsageError

    if format_only and (metrics or out):
        raise UsageError(
            f"--format-only writes COCO results files instead of evaluating; drop {'--eval' if metrics else '--out'}, "
            "or drop --format-only to compute metrics"
        )
    if show_score_thr is not None and show_dir is None:
        raise UsageError("--show-score-thr sets what --show-dir draws; add --show-dir DIR")
    malformed = [option for option in eval_options or [] if "=" not in option]
    if malformed:
        raise UsageError(f"--eval-options {' '.join(malformed)}: write each as KEY=VALUE (e.g. classwise=True)")
    metrics = metrics or ["bbox", "segm"]
    unknown = [metric for metric in metrics if metric not in COCO_METRICS]
    if unknown:
        raise UsageError(f"--eval {' '.join(unknown)}: COCO metrics are {', '.join(COCO_METRICS)}")
    if evaluator not in EVALUATORS:
        raise UsageError(f"--evaluator {evaluator}: use one of {', '.join(EVALUATORS)}")
    notes: list[str] = []
    topology = launch_options(gpus, device, launcher, nnodes, node_rank, master_addr, master_port, partition, srun_args)
    if fp16 and topology.device == "cpu":
        raise UsageError(FP16_ON_CPU)
    config_path, checkpoint = model_files(name, config, checkpoint, dry_run, notes)
    data_root = checked_dataset(data_root, "test", dry_run, notes)
    topology = on_this_machine(topology, dry_run)
    if fp16 and topology.device != "cuda":
        raise UsageError(FP16_ON_CPU)
    checkpoint_path = local_checkpoint(checkpoint, dry_run, notes)
    out = (out or Path("work_dirs") / name / "test_result.json").resolve()
    runner_args = [
        str(config_path), "--checkpoint", str(checkpoint_path), "--data-root", str(data_root),
        "--device", topology.device, "--model-name", name, "--out", str(out), "--eval", *metrics,
    ]
    runner_args += [flag for flag, on in (("--fuse-conv-bn", fuse_conv_bn), ("--fp16", fp16)) if on]
    if evaluator != "pycocotools":
        runner_args += ["--evaluator", evaluator]
    eval_options = list(eval_options or [])
    prefix = None
    if format_only:
        given = [option.split("=", 1)[1] for option in eval_options if option.startswith("jsonfile_prefix=")]
        prefix = Path(given[-1] if given else Path("work_dirs") / name / "results").resolve()
        eval_options = [option for option in eval_options if not option.startswith("jsonfile_prefix=")]
        eval_options.append(f"jsonfile_prefix={prefix}")
        runner_args.append("--format-only")
    if eval_options:
        runner_args += ["--eval-options", *eval_options]
    if show_dir:
        runner_args += ["--show-dir", str(show_dir.resolve())]
        if show_score_thr is not None:
            runner_args += ["--show-score-thr", str(show_score_thr)]
    if cfg_options:
        runner_args += ["--cfg-options", *cfg_options]
    from recnext_cli.launch import RUN_RESULT

    with tempfile.TemporaryDirectory(prefix="recnext-test-") as run_dir:
        from recnext_cli.stack import log_dir

        run_or_show("test", runner_args, topology, notes, dry_run, Path(run_dir), verbose=verbose,
                    log_path=worker_log(log_dir(), "test"))
        if dry_run:
            return
        if prefix:
            typer.echo(f"COCO results files: {prefix}.bbox.json, {prefix}.segm.json (rank 0's machine)", err=True)
        else:
            show_result(out, Path(run_dir) / RUN_RESULT, topology)
        if show_dir:
            typer.echo(f"drawn detections in {show_dir.resolve()} (rank 0's machine)", err=True)


def show_result(out: Path, run_result: Path, topology) -> None:
    """Print the README-format row of this run's metrics: rank 0's copy in the run folder when rank 0 ran on this
    machine, else --out (Slurm: written on the job's first node, found here on a shared disk)."""
    from recnext_cli import results
    from recnext_cli.errors import UsageError

    if topology.launcher == "pytorch" and topology.node_rank != 0:
        return  # rank 0 runs on node 0, which prints the table
    source = run_result if run_result.is_file() else out
    if not source.is_file():
        raise UsageError(
            f"the job finished, but its metrics file {out} is not on this machine: rank 0 wrote it on the job's "
            "first node; pass an --out on a disk this machine shares with it, or copy the file here and run "
            "`recnext results` on it"
        )
    metrics = json.loads(source.read_text())["metrics"]
    if all(key in metrics for key in results.METRICS):
        # The run folder goes when the command ends: the row links to --out, which holds the same record.
        record = dataclasses.replace(results.read_result_file(source), source=out)
        typer.echo(results.markdown_table([record]), nl=False)
    else:
        # The README row needs both bbox and segm; with fewer metrics, show what was computed.
        for key, value in metrics.items():
            typer.echo(f"{key}: {value}")
    typer.echo(f"metrics written to {out}", err=True)
