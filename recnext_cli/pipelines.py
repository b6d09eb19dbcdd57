"""What `recnext test`, `train` and `infer` do once their arguments are parsed, as functions of plain values: the
commands and `recnext demo` call the same functions."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import typer

from recnext_cli.jobs import (
    LaunchOptions,
    checked_dataset,
    existing_file,
    fetched,
    launch_options,
    local_checkpoint,
    model_files,
    on_this_machine,
    pretrain_files,
    run_or_show,
    worker_log,
)

if TYPE_CHECKING:
    from recnext_cli.infer import ImageResult

# What mmdet 2.28's CocoDataset.evaluate computes.
COCO_METRICS = ("bbox", "segm", "proposal", "proposal_fast")
FP16_ON_CPU = ("--fp16 runs on CUDA only (mmcv's fp16 mode autocasts through torch.cuda.amp); "
               "drop --fp16 to test on the CPU")
# What a folder given as IMAGE contributes: the files directly in it with these suffixes (any case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


# ---- test ----


def run_test(
    name: str,
    launch: LaunchOptions = LaunchOptions(),
    *,
    data_root: Path = Path("data/coco"),
    checkpoint: Path | None = None,
    metrics: list[str] | None = None,
    eval_options: list[str] | None = None,
    format_only: bool = False,
    show_dir: Path | None = None,
    show_score_thr: float | None = None,
    cfg_options: list[str] | None = None,
    out: Path | None = None,
    dry_run: bool = False,
    config: Path | None = None,
    fuse_conv_bn: bool = False,
    fp16: bool = False,
    evaluator: str = "pycocotools",
    verbose: bool = False,
) -> None:
    """Evaluate NAME with the workers `launch` describes and print its README row (or, with `dry_run`, the plan).

    The checkpoint is downloaded and verified and the dataset layout checked before any worker starts.
    """
    from recnext_cli.errors import UsageError

    metrics = _checked_test_options(metrics, eval_options, format_only, show_dir, show_score_thr, evaluator, out)
    notes: list[str] = []
    topology = launch_options(launch)
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
    prefix, eval_options = _results_prefix(name, eval_options, format_only)
    if format_only:
        runner_args.append("--format-only")
    if eval_options:
        runner_args += ["--eval-options", *eval_options]
    if show_dir:
        runner_args += ["--show-dir", str(show_dir.resolve())]
        if show_score_thr is not None:
            runner_args += ["--show-score-thr", str(show_score_thr)]
    if cfg_options:
        runner_args += ["--cfg-options", *cfg_options]
    _launch_test(runner_args, topology, notes, dry_run, verbose, out, prefix, show_dir)


def _checked_test_options(metrics, eval_options, format_only, show_dir, show_score_thr, evaluator, out) -> list[str]:
    """The metrics to compute (bbox segm unless given), once the test options are known to fit together."""
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
    return metrics


def _results_prefix(name: str, eval_options: list[str] | None, format_only: bool) -> tuple[Path | None, list[str]]:
    """(absolute COCO results prefix or None, the eval options that carry it): --format-only writes
    PREFIX.bbox.json and PREFIX.segm.json, by default under work_dirs/NAME."""
    eval_options = list(eval_options or [])
    if not format_only:
        return None, eval_options
    given = [option.split("=", 1)[1] for option in eval_options if option.startswith("jsonfile_prefix=")]
    prefix = Path(given[-1] if given else Path("work_dirs") / name / "results").resolve()
    eval_options = [option for option in eval_options if not option.startswith("jsonfile_prefix=")]
    return prefix, [*eval_options, f"jsonfile_prefix={prefix}"]


def _launch_test(runner_args, topology, notes, dry_run, verbose, out: Path, prefix: Path | None, show_dir) -> None:
    """Run (or show) the test job, then say where its results are."""
    from recnext_cli.launch.supervise import RUN_RESULT

    # The workers' output is kept beside what the run writes: the metrics JSON, or the COCO results files.
    log_path = worker_log((prefix or out).parent, "test")
    with tempfile.TemporaryDirectory(prefix="recnext-test-") as run_dir:
        run_or_show("test", runner_args, topology, notes, dry_run, Path(run_dir), verbose=verbose, log_path=log_path)
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


# ---- train ----


def run_train(
    name: str,
    launch: LaunchOptions = LaunchOptions(),
    *,
    data_root: Path = Path("data/coco"),
    work_dir: Path | None = None,
    resume_from: Path | None = None,
    auto_resume: bool = False,
    seed: int = 0,
    diff_seed: bool = False,
    deterministic: bool = False,
    load_from: Path | None = None,
    no_validate: bool = False,
    batch_policy: str = "accumulate",
    cfg_options: list[str] | None = None,
    dry_run: bool = False,
    config: Path | None = None,
    verbose: bool = False,
) -> None:
    """Train NAME's Mask R-CNN with the workers `launch` describes (or, with `dry_run`, print the plan).

    The ImageNet pretrain is downloaded and verified and the dataset layout checked before any worker starts.
    """
    _check_train_options(batch_policy, load_from, resume_from, auto_resume)
    notes: list[str] = []
    topology = launch_options(launch)
    config_path, pretrain_record = pretrain_files(name, config, dry_run, notes)
    if resume_from:
        resume_from = existing_file(resume_from, "--resume-from", dry_run, notes)
    if load_from:
        load_from = existing_file(load_from, "--load-from", dry_run, notes)
    data_root = checked_dataset(data_root, "train", dry_run, notes)
    topology = on_this_machine(topology, dry_run)
    pretrain = fetched(pretrain_record, dry_run, notes).resolve() if pretrain_record else None
    work_dir = (work_dir or Path("work_dirs") / name).resolve()
    runner_args = [
        str(config_path), "--data-root", str(data_root), "--device", topology.device,
        "--work-dir", str(work_dir), "--seed", str(seed), "--batch-policy", batch_policy,
    ]
    runner_args += [flag for flag, on in (
        ("--diff-seed", diff_seed), ("--deterministic", deterministic), ("--no-validate", no_validate)) if on]
    for option, path in (("--load-from", load_from), ("--pretrain", pretrain), ("--resume-from", resume_from)):
        if path:
            runner_args += [option, str(path)]
    if auto_resume:
        runner_args.append("--auto-resume")
    if cfg_options:
        runner_args += ["--cfg-options", *cfg_options]
    if dry_run:
        notes.append(
            f"the run writes its merged config to {work_dir / config_path.name} and its batch plan to "
            f"{work_dir / 'batch.json'}; `recnext config {name} --gpus {launch.gpus * launch.nnodes}` (with the same "
            "--config, --batch-policy and --cfg-options) prints that config now"
        )
    with tempfile.TemporaryDirectory(prefix="recnext-train-") as run_dir:
        run_or_show("train", runner_args, topology, notes, dry_run, Path(run_dir), verbose=verbose,
                    log_path=worker_log(work_dir, "train"))
    if not dry_run:
        typer.echo(f"checkpoints and logs (mmdet's *.log.json included) in {work_dir}", err=True)


def _check_train_options(batch_policy: str, load_from, resume_from, auto_resume: bool) -> None:
    """Refuse a batch policy recnext does not know, and ways to start that exclude each other."""
    from recnext_cli.errors import UsageError
    from recnext_cli.runners.batch import BATCH_POLICIES

    if batch_policy not in BATCH_POLICIES:
        raise UsageError(f"--batch-policy {batch_policy}: use one of {', '.join(BATCH_POLICIES)}")
    if load_from and (resume_from or auto_resume):
        raise UsageError(
            "--load-from starts a new run from weights; --resume-from/--auto-resume continue one: pass one of them"
        )
    if resume_from and auto_resume:
        raise UsageError(
            "--resume-from and --auto-resume exclude each other: name a checkpoint, or let the work dir decide"
        )


# ---- infer ----


@dataclasses.dataclass(frozen=True)
class Drawings:
    """What an infer run made: each image's detections with the path of its drawing, in the order given."""

    drawn: list[tuple[ImageResult, Path]]
    complete: bool  # False when an image could not be read, or a folder or pattern held no image


def run_infer(
    name: str,
    images: list[Path],
    *,
    checkpoint: Path | None = None,
    config: Path | None = None,
    out: Path,
    score_thr: float,
    device: str | None,
    on_error: Callable[[str], None],
) -> Drawings:
    """Run NAME on each image (files, folders, glob patterns) and write OUT/<image>.png with its detections drawn.

    An image that cannot be read, or a folder or pattern with no image, goes to `on_error` as it is met; the others
    are still processed.
    """
    from recnext_cli import infer as library
    from recnext_cli.drawing import draw, drawing_names, write_png
    from recnext_cli.errors import RecnextError, UsageError

    config_path, checkpoint = model_files(name, config, checkpoint, dry_run=False, notes=[])
    given, (images, unmatched) = images, expand_images(images)
    # Before anything is downloaded or built: a run with no image to read would do all that for nothing.
    if not any(path.is_file() for path in images):
        candidates = images or given
        missing = candidates[0] if len(candidates) == 1 else f"any of {len(candidates)} paths (first: {candidates[0]})"
        raise UsageError(f"no image file at {missing}; check the path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder for the drawings")
    checkpoint_path = local_checkpoint(checkpoint, dry_run=False, notes=[])
    detector = library.load_detector(config_path, checkpoint_path, device)
    for problem in unmatched:
        on_error(problem)
    drawn: list[tuple[library.ImageResult, Path]] = []
    for image_path, file_name in zip(images, drawing_names(images)):
        try:
            image = library.load_image(image_path)
        except RecnextError as exc:
            on_error(str(exc))
            continue
        result = detector.detect(image, image_path, score_thr)
        drawing_path = out / file_name
        write_png(draw(image, result.detections), drawing_path)
        drawn.append((result, drawing_path))
    return Drawings(drawn, complete=len(drawn) == len(images) and not unmatched)


def expand_images(arguments: list[Path]) -> tuple[list[Path], list[str]]:
    """IMAGE arguments as files, in order, each once, and a message for each folder or pattern that gave none.

    A folder gives the image files directly in it, a pattern with * ? or [ its matching files (** spans folders),
    both sorted by name; anything else stays as given, so that a missing file is reported when it is read.
    """
    import glob

    expanded: dict[Path, None] = {}
    problems = []
    for argument in arguments:
        if argument.is_dir():
            found = sorted(
                path for path in argument.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            )
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                problems.append(f"no image file in the folder {argument} (looked for {suffixes})")
        elif any(character in str(argument) for character in "*?["):
            found = sorted(Path(match) for match in glob.glob(str(argument), recursive=True) if Path(match).is_file())
            if not found:
                problems.append(f"no file matches {argument}; check the pattern")
        else:
            found = [argument]
        expanded.update(dict.fromkeys(found))
    return list(expanded), problems
