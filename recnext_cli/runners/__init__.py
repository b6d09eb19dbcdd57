"""What every worker process does first: join the job (torchrun or Slurm), repair mmcv/mmdet, load the config."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from recnext_cli.errors import EnvironmentProblem, RecnextError, UsageError
from recnext_cli.launch.plan import DEVICES, LAUNCHERS
from recnext_cli.launch.supervise import RUN_DIR_ENV

# How long a worker that reported an error waits for the launcher to end the job before it exits by itself (the
# launcher polls ten times a second; under srun it may be on another machine and never see the report).
REPORT_WAIT_S = 30.0
PARENT_POLL_S = 0.5


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="mmdet config file")
    parser.add_argument("--data-root", required=True, type=Path, help="COCO 2017 root (holds annotations/)")
    parser.add_argument("--device", choices=DEVICES, default="cuda")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, as mmdet's tools take them")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[03-05,09],cpu1` (what `scontrol show hostnames` prints first)."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def slurm_master_port(job_id: str) -> int:
    # Jobs whose first node is the same machine would collide on one fixed port; the job id spreads them out.
    return 20000 + int(job_id) % 20000


def torchrun_env_from_slurm(environ: dict[str, str]) -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables torchrun would set, derived from an srun task's variables."""
    try:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
        env = {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(slurm_master_port(environ["SLURM_JOB_ID"])),
        }
    except KeyError as exc:
        raise EnvironmentProblem(
            f"--launcher slurm, but {exc.args[0]} is not set: "
            "start the workers with srun (as `recnext … --launcher slurm` does)"
        ) from None
    return env


# What torchrun tells its workers about the job; a `--launcher none` worker is the whole job, whatever these say.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def join_job(launcher: str) -> None:
    """Make the environment look like torchrun's, whichever launcher started this worker.

    A single process (`none`) drops what its parent's environment says about another job: inside a Slurm allocation
    or a shell that exported RANK=0 WORLD_SIZE=4, it would otherwise wait forever for three workers nobody starts.
    """
    if launcher == "slurm":
        os.environ.update(torchrun_env_from_slurm(dict(os.environ)))
    elif launcher == "none":
        for name in TORCHRUN_VARIABLES:
            os.environ.pop(name, None)


def load_config(path: str, data_root: Path, cfg_options: list[str]):
    """The mmdet config at `path`, aimed at `data_root`, with `KEY=VALUE` overrides applied last so they win.

    Call after prepare_worker: the config may name RecNeXt backbones, which recnext_cli.models registers.
    """
    from mmcv import Config, DictAction
    from mmdet.utils import replace_cfg_vals

    from recnext_cli.models import set_data_root

    try:
        cfg = replace_cfg_vals(Config.fromfile(path))
    except (SyntaxError, OSError, ImportError, KeyError, TypeError, ValueError) as exc:
        # mmcv executes the config file and its _base_ files: any of these means the file, not recnext, is wrong.
        raise UsageError(f"config {path} cannot be loaded: {_one_line(exc)}") from None
    set_data_root(cfg, data_root)
    if cfg_options:
        # mmcv's own parser for `KEY=VALUE`, so lists and tuples read as they do with mmdet's tools.
        parsed = argparse.Namespace()
        try:
            DictAction(option_strings=[], dest="overrides")(None, parsed, cfg_options)
            cfg.merge_from_dict(parsed.overrides)
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"--cfg-options {' '.join(cfg_options)}: {_one_line(exc)}") from None
    return cfg


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def quiet_worker_output() -> None:
    """Keep each worker's console to mmdet's progress and results.

    mmcv 1.7 warns about its 2.0 rename at every import and, without a log file yet, prints one multi-line record per
    parameter when a model initialises its weights (thousands of lines for Mask R-CNN); neither helps a user here.
    """
    import logging

    from recnext_cli import noise

    noise.silence()
    from mmcv.utils import get_logger

    # get_logger sets the level only the first time a name is asked for; later calls keep ours.
    get_logger("mmcv").setLevel(logging.WARNING)


def die_with_parent() -> None:
    """End this worker when the process that started it (torchrun, srun's step daemon, recnext) is gone.

    torchrun stops its workers when it is asked to, but a torchrun killed outright leaves them to init, running
    on; a daemon thread watching the parent pid ends the worker within PARENT_POLL_S of that.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="recnext-parent-watch", daemon=True).start()


def report_error(exc: RecnextError) -> None:
    """Hand `exc` to the launcher as one line for the whole job; without a launcher, print that line here."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir or not os.path.isdir(run_dir):
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return
    with tempfile.NamedTemporaryFile("w", dir=run_dir, prefix=".report-", delete=False) as file:
        file.write(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
    os.replace(file.name, os.path.join(run_dir, f"error-rank{os.environ.get('RANK', '0')}.json"))
    # The launcher ends the job as soon as it reads the report; exiting first would let torchrun print a failure
    # summary, and each other rank its own traceback, before that.
    time.sleep(REPORT_WAIT_S)
    print(f"error: {exc}", file=sys.stderr, flush=True)  # still here: no launcher read the report


def run_worker(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a worker's `main`: a RecnextError it raises ends the job with one line and exit status 2."""
    try:
        return main(argv)
    except RecnextError as exc:
        report_error(exc)
        return 2


def build_detector(cfg, device: str):
    """mmdet's build_detector for `cfg.model`, SyncBatchNorm or not decided by the run's device, not by the GPUs seen."""
    from mmdet.models import build_detector as mmdet_build_detector

    from recnext_cli.nn.sync_bn import run_device

    with run_device(device):
        return mmdet_build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))


def prepare_worker(launcher: str) -> None:
    """Watch the parent, join the job's environment, apply the mmcv/mmdet fixes, register the RecNeXt backbones."""
    die_with_parent()
    join_job(launcher)
    quiet_worker_output()
    from recnext_cli import compat

    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones with mmdet)
