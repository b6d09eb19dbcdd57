"""`recnext config`: print the final merged mmdet config that `recnext train` would run, for reading and diffing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from recnext_cli.commands._options import BatchPolicy, CfgOptions, Config, DataRoot, Gpus, ModelName, Nnodes


def config(
    name: ModelName,
    gpus: Gpus = 1,
    nnodes: Nnodes = 1,
    data_root: DataRoot = Path("data/coco"),
    work_dir: Annotated[Optional[Path], typer.Option(
        "--work-dir", help="The run's work dir (default: work_dirs/NAME)", show_default=False,
    )] = None,
    batch_policy: BatchPolicy = "accumulate",
    cfg_options: CfgOptions = None,
    config: Config = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Also write the config to this file (written whole or not at all).", show_default=False,
    )] = None,
) -> None:
    """Print the config a `recnext train NAME` run with these options would use: the zoo's (or --config's) file
    with the data root, the cached ImageNet pretrain, the work dir, --cfg-options and the batch plan applied.

    Nothing is downloaded and no worker starts; the batch plan goes to stderr. Put NAME first: --cfg-options takes
    every word that follows it.
    """
    from recnext_cli import compat, fetch
    from recnext_cli.runners import quiet_worker_output
    from recnext_cli.runners import train as train_runner
    from recnext_cli.errors import UsageError
    from recnext_cli.jobs import pretrain_files
    from recnext_cli.runners.batch import BATCH_POLICIES

    if batch_policy not in BATCH_POLICIES:
        raise UsageError(f"--batch-policy {batch_policy}: use one of {', '.join(BATCH_POLICIES)}")
    if gpus < 1 or nnodes < 1:
        raise UsageError("--gpus and --nnodes count workers and machines: give each at least 1")
    config_path, pretrain_record = pretrain_files(name, config, dry_run=True, notes=[])
    runner_args = [
        str(config_path), "--data-root", str(data_root.resolve()), "--device", "cuda",
        "--work-dir", str((work_dir or Path("work_dirs") / name).resolve()), "--batch-policy", batch_policy,
    ]
    if pretrain_record:
        runner_args += ["--pretrain", str(fetch.cached_state(pretrain_record).path.resolve())]
    if cfg_options:
        runner_args += ["--cfg-options", *cfg_options]
    quiet_worker_output()
    compat.apply_all()
    import recnext_cli.models  # noqa: F401  (registers the RecNeXt backbones with mmdet)

    cfg, plan = train_runner.training_config(train_runner.parse_args(runner_args), gpus * nnodes)
    text = cfg.pretty_text
    typer.echo(text, nl=not text.endswith("\n"))
    typer.echo(plan.summary(), err=True)
    if out:
        out = out.resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False) as file:
            file.write(text)
        os.replace(file.name, out)
        typer.echo(f"config written to {out}", err=True)
