"""Running and stopping a job: its process group and descendants, and the run folder its workers report to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable

from recnext_cli import errors
from recnext_cli.errors import EnvironmentProblem, RecnextError
from recnext_cli.launch.plan import LaunchPlan

# The launcher hands every worker a private folder of this run through this variable: workers leave their one-line
# errors there (RUN_ERROR_GLOB) and rank 0 the test metrics (RUN_RESULT), for the launcher to read.
RUN_DIR_ENV = "RECNEXT_RUN_DIR"
RUN_ERROR_GLOB = "error-rank*.json"
RUN_RESULT = "result.json"
# The process a launcher starts gets this signal when the launcher dies, even by SIGKILL: torchrun and srun both
# stop their workers on SIGTERM. (Linux prctl option PR_SET_PDEATHSIG.)
PR_SET_PDEATHSIG = 1
# torchrun gives its workers 30 s to stop after SIGTERM before it kills them; wait a little longer than that.
STOP_GRACE_S = 45.0


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process (Linux /proc; empty elsewhere)."""
    table = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields follow the parenthesised command name, which may itself hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int) -> dict[int, int]:
    """Every live process below `pid`, as pid -> start time (a pid with another start time is a different process)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child][1]
            todo.append(child)
    return found


def _kill_survivors(processes: dict[int, int]) -> None:
    """SIGKILL those of `processes` that still run (same pid and same start time)."""
    table = _process_table()
    for pid, started in processes.items():
        if table.get(pid, (None, None))[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen) -> bool:
    if not hasattr(os, "waitid"):  # macOS
        return proc.poll() is not None
    # WNOWAIT leaves the child a zombie, so its pid (our process group id) cannot be reused while we clean up.
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _die_with_launcher():
    """A preexec_fn tying the started process to this one: it gets SIGTERM when we die, SIGKILL included (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only makes one system call
    launcher_pid = os.getpid()

    def set_up() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher_pid:  # we died between the fork and the prctl
            os._exit(128 + signal.SIGTERM)

    return set_up


def job_error(run_dir: Path) -> RecnextError | None:
    """The first one-line error a worker of the run reported, as the RecnextError subclass it was raised as."""
    reports = []
    for path in run_dir.glob(RUN_ERROR_GLOB):
        try:
            reports.append((path.stat().st_mtime_ns, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    if not reports:
        return None
    _, report = min(reports, key=lambda item: item[0])
    kind = getattr(errors, str(report.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, RecnextError)):
        kind = RecnextError
    return kind(str(report.get("message")))


def run(plan: LaunchPlan, run_dir: Path | None = None, grace_s: float = STOP_GRACE_S, *,
        output: IO | None = None, on_poll: Callable[[], None] | None = None) -> int:
    """Run the plan in its own process group and return its exit status (128 + N when signal N stopped it).

    Ctrl-C, SIGTERM or SIGHUP asks the launcher to stop its workers (torchrun and srun both pass SIGTERM on); a
    second signal, or `grace_s` without an exit, kills them. torchrun starts each worker in a session of its own, out
    of reach of the group: every process seen below the launcher after a stop request is killed if it outlives it.
    If this process is killed outright, the launcher gets SIGTERM from the kernel, and the workers watch their parent.

    With `run_dir`, the workers report RecnextErrors there: the first report ends the whole job at once, before
    torchrun prints a failure summary, and is raised here, so a job fails with one line whatever its size.
    `output` (a file) takes the job's stdout and stderr instead of this terminal; `on_poll` runs at every poll.
    """
    env = {**os.environ, **plan.env}
    if run_dir is not None:
        env[RUN_DIR_ENV] = str(run_dir)
    try:
        redirect = {"stdout": output, "stderr": subprocess.STDOUT} if output is not None else {}
        proc = subprocess.Popen(plan.argv, env=env, start_new_session=True, preexec_fn=_die_with_launcher(),
                                **redirect)
    except FileNotFoundError:
        hint = "; --launcher slurm needs a machine where Slurm's srun works" if plan.argv[0] == "srun" else ""
        raise EnvironmentProblem(f"cannot start the job: {plan.argv[0]} is not on PATH{hint}") from None
    stop_requests: list[int] = []
    stopping: dict[int, int] = {}

    def force_stop() -> None:
        stopping.update(descendants(proc.pid))
        _killpg(proc.pid, signal.SIGKILL)
        _kill_survivors(stopping)

    def request_stop(signum, _frame) -> None:
        stop_requests.append(signum)
        if len(stop_requests) == 1:
            stopping.update(descendants(proc.pid))
            _killpg(proc.pid, signal.SIGTERM)
        else:
            force_stop()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, request_stop) for sig in handled}
    error = None
    try:
        first_request = None
        while not _exited(proc):
            if run_dir is not None and (error := job_error(run_dir)):
                force_stop()
                break
            if stop_requests:
                first_request = first_request or time.monotonic()
                stopping.update(descendants(proc.pid))
                if time.monotonic() - first_request > grace_s:
                    force_stop()
            if on_poll is not None:
                on_poll()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not _exited(proc):
            force_stop()
        # What is left in the group (data loader workers of a `none` run, say) or below goes with the job.
        _killpg(proc.pid, signal.SIGKILL)
        _kill_survivors(stopping)
        returncode = proc.wait()
    if stop_requests:
        return 128 + stop_requests[0]
    error = error or (job_error(run_dir) if run_dir is not None else None)
    if error is not None:
        raise error
    return 128 - returncode if returncode < 0 else returncode

