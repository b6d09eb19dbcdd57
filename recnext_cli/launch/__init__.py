"""Starting test / train workers: plan.py builds the command line, supervise.py runs and stops the job."""

from __future__ import annotations

from recnext_cli.launch.plan import (
    DEFAULT_MASTER_PORT,
    DEVICES,
    LAUNCHERS,
    RUNNER_MODULES,
    LaunchPlan,
    Topology,
    build_plan,
    check_options,
    check_topology,
    default_launcher,
    parse_srun_args,
    require_runner_stack,
    resolve_device,
    visible_gpus,
)
from recnext_cli.launch.supervise import (
    RUN_DIR_ENV,
    RUN_ERROR_GLOB,
    RUN_RESULT,
    STOP_GRACE_S,
    descendants,
    job_error,
    run,
)

__all__ = [
    "DEFAULT_MASTER_PORT", "DEVICES", "LAUNCHERS", "RUNNER_MODULES", "LaunchPlan", "Topology", "build_plan",
    "check_options", "check_topology", "default_launcher", "parse_srun_args", "require_runner_stack",
    "resolve_device", "visible_gpus",
    "RUN_DIR_ENV", "RUN_ERROR_GLOB", "RUN_RESULT", "STOP_GRACE_S", "descendants", "job_error", "run",
]
