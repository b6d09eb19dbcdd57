"""What every worker process does first: join the job (torchrun or Slurm), repair mmcv/mmdet, load the config."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from recnext_cli.errors import EnvironmentProblem
from recnext_cli.launch import DEVICES, LAUNCHERS


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


def join_job(launcher: str) -> None:
    """Make the environment look like torchrun's, whichever launcher started this worker."""
    if launcher == "slurm":
        os.environ.update(torchrun_env_from_slurm(dict(os.environ)))


def load_config(path: str, data_root: Path, cfg_options: list[str]):
    """The mmdet config at `path`, aimed at `data_root`, with `KEY=VALUE` overrides applied last so they win.

    Call after prepare_worker: the config may name RecNeXt backbones, which recnext_cli.models registers.
    """
    from mmcv import Config, DictAction
    from mmdet.utils import replace_cfg_vals

    from recnext_cli.models import set_data_root

    cfg = replace_cfg_vals(Config.fromfile(path))
    set_data_root(cfg, data_root)
    if cfg_options:
        # mmcv's own parser for `KEY=VALUE`, so lists and tuples read as they do with mmdet's tools.
        parsed = argparse.Namespace()
        DictAction(option_strings=[], dest="overrides")(None, parsed, cfg_options)
        cfg.merge_from_dict(parsed.overrides)
    return cfg


def quiet_worker_output() -> None:
    """Keep each worker's console to mmdet's progress and results.

    mmcv 1.7 warns about its 2.0 rename at every import and, without a log file yet, prints one multi-line record per
    parameter when a model initialises its weights (thousands of lines for Mask R-CNN); neither helps a user here.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="On January 1, 2023, MMCV will release v2.0.0")
    from mmcv.utils import get_logger

    # get_logger sets the level only the first time a name is asked for; later calls keep ours.
    get_logger("mmcv").setLevel(logging.WARNING)


def prepare_worker(launcher: str) -> None:
    """Join the job's environment, apply the in-process mmcv/mmdet fixes, register the RecNeXt backbones."""
    join_job(launcher)
    quiet_worker_output()
    from recnext_cli import compat

    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones with mmdet)
