"""The launcher: torchrun/srun/plain command lines, --gpus and dataset checks, --dry-run, and stopping a job cleanly."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recnext_cli import datasets, launch
from recnext_cli.cli import app
from recnext_cli.commands._options import expand_variadic
from recnext_cli.errors import DatasetLayoutError, EnvironmentProblem, UnknownModelError, UsageError
from recnext_cli.launch import plan as launch_plan
from recnext_cli.launch.plan import Topology, build_plan, check_topology
from recnext_cli.runners import first_host, torchrun_env_from_slurm
from recnext_cli.zoo import CONFIG_ROOT

CONFIG = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"


def test_torchrun_plan_is_the_documented_command_line():
    topology = Topology("pytorch", nproc_per_node=4, device="cuda", nnodes=2, node_rank=1,
                        master_addr="10.0.0.1", master_port=29600)
    plan = build_plan("test", ["cfg.py", "--checkpoint", "c.pth"], topology, python="py")
    assert plan.argv == (
        "py", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "4",
        "--master-addr", "10.0.0.1", "--master-port", "29600",
        "-m", "recnext_cli.runners.test", "cfg.py", "--checkpoint", "c.pth", "--launcher", "pytorch",
    )
    assert plan.env == {}


def test_single_node_torchrun_binds_its_own_port_and_multi_node_a_fixed_one():
    single = build_plan("train", [], Topology("pytorch", nproc_per_node=2, device="cuda"), python="py")
    # No port probed here and bound later by torchrun (another process could take it in between): torchrun's
    # standalone rendezvous binds port 0 itself and hands that socket's port to its workers.
    assert "--standalone" in single.argv and "--master-port" not in single.argv
    fixed = build_plan("train", [], Topology("pytorch", 2, "cuda", master_port=29601), python="py")
    assert fixed.argv[fixed.argv.index("--master-port") + 1] == "29601" and "--standalone" not in fixed.argv
    assert fixed.argv[fixed.argv.index("--master-addr") + 1] == "127.0.0.1"
    multi = build_plan("train", [], Topology("pytorch", 2, "cuda", nnodes=2, master_addr="node0"), python="py")
    assert multi.argv[multi.argv.index("--master-port") + 1] == str(launch.DEFAULT_MASTER_PORT)


def test_cpu_workers_hide_gpus_and_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    plan = build_plan("test", [], Topology("pytorch", nproc_per_node=2, device="cpu"), python="py")
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "OMP_NUM_THREADS" not in build_plan("test", [], Topology("none", 1, "cpu"), python="py").env


def test_slurm_plan_runs_srun_with_tasks_per_node_and_kills_the_step_on_a_failure():
    topology = Topology("slurm", nproc_per_node=8, device="cuda", nnodes=2, partition="gpu",
                        srun_args=("--time", "2:00:00"))
    plan = build_plan("train", ["cfg.py"], topology, python="py")
    assert plan.argv == (
        "srun", "--partition", "gpu", "--job-name", "recnext-train", "--nodes", "2", "--ntasks", "16",
        "--ntasks-per-node", "8", "--gres=gpu:8", "--kill-on-bad-exit=1", "--time", "2:00:00",
        "py", "-u", "-m", "recnext_cli.runners.train", "cfg.py", "--launcher", "slurm",
    )
    assert plan.env == {}
    fixed = build_plan("train", [], Topology("slurm", 1, "cuda", master_addr="n1", master_port=1234), python="py")
    assert fixed.env == {"MASTER_ADDR": "n1", "MASTER_PORT": "1234"}


def test_plain_plan_is_one_python_process():
    plan = build_plan("test", ["cfg.py"], Topology("none", 1, "cuda"), python="py")
    assert plan.argv == ("py", "-m", "recnext_cli.runners.test", "cfg.py", "--launcher", "none")


def test_plan_shell_line_round_trips_through_a_shell_parser():
    plan = build_plan("test", ["my config.py"], Topology("none", 1, "cpu"), python="py")
    words = shlex.split(plan.shell())
    assert words[0] == "CUDA_VISIBLE_DEVICES=" and "my config.py" in words


@pytest.mark.parametrize(
    ("topology", "visible", "message"),
    [
        (Topology("pytorch", 0, "cuda"), 8, "--gpus 0: need at least 1"),
        (Topology("pytorch", -2, "cpu"), 0, "--gpus -2: need at least 1"),
        (Topology("pytorch", 4, "cuda"), 2, "--gpus 4, but only 2 GPU(s) are visible"),
        (Topology("none", 2, "cpu"), 0, "--launcher none runs one process"),
        (Topology("pytorch", 1, "cuda", nnodes=2), 1, "needs --master-addr"),
        (Topology("pytorch", 1, "cuda", nnodes=2, node_rank=2, master_addr="a"), 1, "--node-rank 2 is outside 0..1"),
        (Topology("mpi", 1, "cpu"), 0, "--launcher 'mpi' is not one of"),
    ],
)
def test_impossible_topologies_are_refused(topology, visible, message):
    with pytest.raises(UsageError) as info:
        check_topology(topology, visible)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_possible_topologies_pass():
    check_topology(Topology("pytorch", 2, "cuda"), 2)
    check_topology(Topology("pytorch", 16, "cpu"), 0)  # CPU workers are processes, not devices
    check_topology(Topology("slurm", 8, "cuda", nnodes=4), 0)  # the launching host of an srun job may have none


def test_device_defaults_to_cuda_only_when_a_gpu_is_visible():
    assert launch.resolve_device(None, 0, "pytorch") == "cpu"
    assert launch.resolve_device(None, 1, "none") == "cuda"
    with pytest.raises(UsageError, match="sees no CUDA GPU"):
        launch.resolve_device("cuda", 0, "pytorch")
    with pytest.raises(UsageError, match="--device 'tpu' is not one of cuda, cpu"):
        launch.resolve_device("tpu", 1, "pytorch")


def test_slurm_jobs_default_to_cuda_even_from_a_login_node_without_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path))
    monkeypatch.setattr(launch_plan, "visible_gpus", lambda: pytest.fail("a Slurm launch must not count local GPUs"))
    result = CliRunner().invoke(app, ["test", "m3", "--launcher", "slurm", "--gpus", "8", "--nnodes", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--ntasks 16 --ntasks-per-node 8 --gres=gpu:8" in result.stdout and "--device cuda" in result.stdout


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu07", "gpu07"), ("gpu[03-05,09],cpu1", "gpu03"), ("a1,b[2-3]", "a1"), ("rack[2-3]-n[011,020]", "rack2-n011")],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_slurm_task_variables_become_torchrun_variables():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]",
               "SLURM_JOB_ID": "123456"}
    assert torchrun_env_from_slurm(environ) == {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert torchrun_env_from_slurm({**environ, "MASTER_PORT": "29999"})["MASTER_PORT"] == "29999"
    with pytest.raises(EnvironmentProblem, match="SLURM_PROCID is not set: start the workers with srun"):
        torchrun_env_from_slurm({k: v for k, v in environ.items() if k != "SLURM_PROCID"})


def test_a_single_worker_ignores_the_job_its_parent_environment_describes():
    # Inside a Slurm allocation, or after an earlier torchrun job in the same shell, RANK/WORLD_SIZE may describe
    # another job: a `--launcher none` worker must still run alone instead of waiting for ranks nobody starts.
    code = ("from recnext_cli.runners import join_job; from recnext_cli.compat import init_distributed; "
            "join_job('none'); print(init_distributed('cpu'))")
    stale = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731"}
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **stale}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(0, 1)"


def test_variadic_options_take_every_following_word():
    args = ["m3", "--eval", "bbox", "segm", "--gpus", "2", "--cfg-options", "a=1", "b=[1,2]", "--dry-run"]
    assert expand_variadic(args, ("--eval", "--cfg-options")) == [
        "m3", "--eval", "bbox", "--eval", "segm", "--gpus", "2", "--cfg-options", "a=1", "--cfg-options", "b=[1,2]",
        "--dry-run",
    ]
    assert expand_variadic(["--eval", "bbox", "--", "segm"], ("--eval",)) == ["--eval", "bbox", "--", "segm"]


def test_dataset_layout_problems_name_what_is_missing(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    assert datasets.coco_layout_problems(tmp_path, ("val2017",)) == ["val2017/"]
    with pytest.raises(DatasetLayoutError) as info:
        datasets.check_coco_layout(tmp_path, datasets.SPLITS_FOR["train"])
    message = str(info.value)
    assert "missing annotations/instances_train2017.json, train2017/, val2017/" in message
    assert f"expected {tmp_path}/{{annotations/instances_train2017.json, annotations/instances_val2017.json, " in message
    assert "\n" not in message
    (tmp_path / "val2017").mkdir()
    datasets.check_coco_layout(tmp_path, ("val2017",))


def _coco_tree(root: Path, splits=("train2017", "val2017")) -> Path:
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        (root / "annotations" / f"instances_{split}.json").write_text("{}")
        (root / split).mkdir()
    return root


def test_test_dry_run_prints_the_exact_command_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"")
    data = _coco_tree(tmp_path / "coco")
    result = CliRunner().invoke(app, [
        "test", "tiny", "--config", str(CONFIG), "--checkpoint", str(checkpoint), "--data-root", str(data),
        "--device", "cpu", "--gpus", "2", "--master-port", "29811", "--eval", "bbox", "segm",
        "--cfg-options", "data.workers_per_gpu=0", "model.test_cfg.rcnn.max_per_img=50",
        "--out", str(tmp_path / "m.json"), "--dry-run",
    ])
    assert result.exit_code == 0, result.output
    assert shlex.split(result.stdout) == [
        "CUDA_VISIBLE_DEVICES=", sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", "29811", "-m", "recnext_cli.runners.test", str(CONFIG),
        "--checkpoint", str(checkpoint), "--data-root", str(data), "--device", "cpu", "--model-name", "tiny",
        "--out", str(tmp_path / "m.json"), "--eval", "bbox", "segm",
        "--cfg-options", "data.workers_per_gpu=0", "model.test_cfg.rcnn.max_per_img=50", "--launcher", "pytorch",
    ]
    assert "note" not in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_dry_run_says_what_is_missing_but_still_prints_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["train", "m3", "--device", "cpu", "--data-root", str(tmp_path / "nowhere"),
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "recnext_m3_distill_300e.pth is missing in the cache" in result.stderr
    assert f"{tmp_path / 'nowhere'} lacks annotations/instances_train2017.json" in result.stderr
    pretrain = tmp_path / "home" / "checkpoints" / "recnext_m3_distill_300e.pth"
    assert f"--pretrain {pretrain}" in result.stdout
    assert "-m recnext_cli.runners.train" in result.stdout and "--launcher none" in result.stdout
    assert "mask_rcnn_recnext_m3_fpn_1x_coco.py" in result.stdout
    assert not (tmp_path / "home" / "checkpoints").exists()


def test_train_passes_resume_choices_to_the_workers(tmp_path):
    data = _coco_tree(tmp_path / "coco")
    common = ["train", "tiny", "--config", str(CONFIG), "--device", "cpu", "--data-root", str(data), "--dry-run",
              "--work-dir", str(tmp_path / "w")]
    auto = CliRunner().invoke(app, [*common, "--auto-resume"])
    assert auto.exit_code == 0, auto.output
    assert "--auto-resume" in auto.stdout and "--pretrain" not in auto.stdout
    assert "'tiny' is not in the zoo" in auto.stderr
    both = CliRunner().invoke(app, [*common, "--auto-resume", "--resume-from", str(tmp_path / "x.pth")])
    assert isinstance(both.exception, UsageError) and "exclude each other" in str(both.exception)


def test_train_passes_mmdet_tool_flags_and_the_batch_policy_to_the_workers(tmp_path):
    data = _coco_tree(tmp_path / "coco")
    (tmp_path / "w.pth").write_bytes(b"x")
    common = ["train", "tiny", "--config", str(CONFIG), "--device", "cpu", "--data-root", str(data), "--dry-run"]
    result = CliRunner().invoke(app, [*common, "--load-from", str(tmp_path / "w.pth"), "--no-validate",
                                      "--diff-seed", "--deterministic", "--batch-policy", "linear-lr"])
    assert result.exit_code == 0, result.output
    for words in (f"--load-from {tmp_path / 'w.pth'}", "--no-validate", "--diff-seed", "--deterministic",
                  "--batch-policy linear-lr"):
        assert words in result.stdout
    assert "`recnext config tiny --gpus 1`" in result.stderr and "batch.json" in result.stderr
    both = CliRunner().invoke(app, [*common, "--load-from", str(tmp_path / "w.pth"), "--auto-resume"])
    assert isinstance(both.exception, UsageError) and "--load-from starts a new run" in str(both.exception)
    policy = CliRunner().invoke(app, [*common, "--batch-policy", "half"])
    assert isinstance(policy.exception, UsageError) and "accumulate, linear-lr, as-configured" in str(policy.exception)


@pytest.mark.parametrize("flags, message", [
    (["--format-only", "--eval", "bbox"], "--format-only writes COCO results files instead of evaluating; drop --eval"),
    (["--format-only", "--out", "m.json"], "drop --out"),
    (["--show-score-thr", "0.5"], "add --show-dir DIR"),
    (["--eval-options", "classwise"], "write each as KEY=VALUE"),
])
def test_test_flags_that_cannot_apply_are_refused_in_one_line(tmp_path, flags, message):
    result = CliRunner().invoke(app, ["test", "tiny", "--config", str(CONFIG), "--checkpoint", "w.pth",
                                      "--device", "cpu", "--dry-run", *flags])
    assert isinstance(result.exception, UsageError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_test_passes_format_only_show_dir_and_eval_options_to_the_workers(tmp_path):
    data = _coco_tree(tmp_path / "coco")
    result = CliRunner().invoke(app, ["test", "tiny", "--config", str(CONFIG), "--checkpoint", str(tmp_path / "w.pth"),
                                      "--device", "cpu", "--data-root", str(data), "--dry-run", "--format-only",
                                      "--show-dir", str(tmp_path / "drawn"), "--show-score-thr", "0.5",
                                      "--eval-options", "classwise=True", "iou_thrs=[0.5]"])
    assert result.exit_code == 0, result.output
    prefix = Path("work_dirs/tiny/results").resolve()
    assert "--format-only" in result.stdout
    assert f"--eval-options classwise=True 'iou_thrs=[0.5]' jsonfile_prefix={prefix}" in result.stdout
    assert f"--show-dir {tmp_path / 'drawn'} --show-score-thr 0.5" in result.stdout


def test_unknown_model_and_config_without_checkpoint_are_refused(tmp_path):
    unknown = CliRunner().invoke(app, ["test", "m33", "--device", "cpu", "--dry-run"])
    assert isinstance(unknown.exception, UnknownModelError) and "did you mean m3" in str(unknown.exception)
    no_weights = CliRunner().invoke(app, ["test", "tiny", "--config", str(CONFIG), "--device", "cpu", "--dry-run"])
    assert isinstance(no_weights.exception, UsageError) and "also needs --checkpoint" in str(no_weights.exception)


@pytest.mark.parametrize("gpus", ["0", "-1"])
def test_gpus_below_one_are_refused(gpus):
    result = CliRunner().invoke(app, ["test", "m3", "--device", "cpu", "--gpus", gpus, "--dry-run"])
    assert isinstance(result.exception, UsageError)
    assert str(result.exception).startswith(f"--gpus {gpus}: need at least 1 (CPU worker processes per node)")


def test_more_gpus_than_visible_are_refused(monkeypatch):
    monkeypatch.setattr(launch_plan, "visible_gpus", lambda: 2)
    result = CliRunner().invoke(app, ["test", "m3", "--gpus", "4", "--dry-run"])
    assert isinstance(result.exception, UsageError)
    assert "--gpus 4, but only 2 GPU(s) are visible on this node" in str(result.exception)


def test_usage_errors_exit_2_with_one_red_line():
    proc = subprocess.run([sys.executable, "-m", "recnext_cli", "test", "m3", "--device", "cpu", "--gpus", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "error: --gpus 0: need at least 1 (CPU worker processes per node)\n"


def test_a_missing_dataset_stops_the_launch_before_any_worker(tmp_path):
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"")
    result = CliRunner().invoke(app, ["test", "tiny", "--config", str(CONFIG), "--checkpoint", str(checkpoint),
                                      "--device", "cpu", "--data-root", str(tmp_path)])
    assert isinstance(result.exception, DatasetLayoutError)
    assert "missing annotations/instances_val2017.json, val2017/" in str(result.exception)


def test_the_dataset_is_checked_before_a_checkpoint_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECNEXT_OFFLINE", "1")  # a download attempt would raise DownloadError instead
    result = CliRunner().invoke(app, ["train", "m3", "--device", "cpu", "--data-root", str(tmp_path)])
    assert isinstance(result.exception, DatasetLayoutError)


def test_files_named_on_the_command_line_must_exist(tmp_path):
    data = _coco_tree(tmp_path / "coco")
    result = CliRunner().invoke(app, ["test", "tiny", "--config", str(CONFIG), "--checkpoint", str(tmp_path / "no.pth"),
                                      "--device", "cpu", "--data-root", str(data)])
    assert isinstance(result.exception, UsageError)
    assert str(result.exception) == f"--checkpoint {tmp_path / 'no.pth'} does not exist"
    dry = CliRunner().invoke(app, ["train", "tiny", "--config", str(tmp_path / "c.py"), "--device", "cpu",
                                   "--data-root", str(data), "--dry-run"])
    assert dry.exit_code == 0 and f"--config {tmp_path / 'c.py'} does not exist yet" in dry.stderr


def test_the_launcher_refuses_a_torch_too_old_to_load_checkpoints_safely(monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version
    # What the installed distribution metadata says where torch 2.5.1 is installed (weights-only unpickler CVE).
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.5.1" if name == "torch" else real_version(name))
    pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")
    with pytest.raises(EnvironmentProblem, match=r"torch 2\.5\.1 in .* cannot load checkpoints safely .* >= 2\.6"):
        launch.require_runner_stack()


def _plan(code: str) -> launch.LaunchPlan:
    return launch.LaunchPlan((sys.executable, "-c", textwrap.dedent(code)), {})


def test_run_returns_the_job_exit_status():
    assert launch.run(_plan("import sys; sys.exit(3)")) == 3
    assert launch.run(_plan("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")) == 128 + signal.SIGKILL


# A stand-in for torchrun: it starts a worker in a session of its own (as torchrun does), records the worker's pid,
# and ignores SIGTERM, so only the wrapper's escalation can end it.
LAUNCHER_LIKE_TORCHRUN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGHUP,), (signal.SIGINT, signal.SIGINT)])
def test_stopping_the_wrapper_leaves_no_worker_behind(tmp_path, signals):
    pid_file = tmp_path / "worker.pid"
    wrapper = textwrap.dedent(f"""
        import sys
        from recnext_cli import launch
        plan = launch.LaunchPlan((sys.executable, "-c", {LAUNCHER_LIKE_TORCHRUN!r}, {str(pid_file)!r}), {{}})
        sys.exit(launch.run(plan, grace_s=1.0))
    """)
    proc = subprocess.Popen([sys.executable, "-c", wrapper])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
    assert proc.wait(timeout=20) == 128 + signals[0]
    deadline = time.monotonic() + 5
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited and only waits for its new parent to collect it


def _wait_for_pid_file(path: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 20
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return int(path.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def test_the_started_launcher_gets_sigterm_when_recnext_is_killed_outright(tmp_path):
    # SIGKILL cannot be caught: the kernel passes the launcher SIGTERM instead (PR_SET_PDEATHSIG), as torchrun needs.
    pid_file = tmp_path / "launcher.pid"
    launcher = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    wrapper = textwrap.dedent(f"""
        import sys
        from recnext_cli import launch
        sys.exit(launch.run(launch.LaunchPlan((sys.executable, "-c", {launcher!r}), {{}})))
    """)
    proc = subprocess.Popen([sys.executable, "-c", wrapper])
    started = _wait_for_pid_file(pid_file, proc)
    proc.kill()
    proc.wait()
    assert _gone_within(started, 5)


def test_a_worker_ends_when_its_parent_is_killed_outright(tmp_path):
    pid_file = tmp_path / "worker.pid"
    worker = textwrap.dedent(f"""
        import os, time
        from recnext_cli.runners import die_with_parent
        die_with_parent()
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    # The parent starts the worker in a session of its own and ignores SIGTERM, as a stuck torchrun might.
    parent = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {worker!r}], start_new_session=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    worker_pid = _wait_for_pid_file(pid_file, proc)
    proc.kill()
    proc.wait()
    assert _gone_within(worker_pid, 5)


# A worker whose `main` raises a RecnextError, run by the worker wrapper every runner module uses.
FAILING_WORKER = """
import os, sys
from recnext_cli.errors import {kind}
from recnext_cli.runners import run_worker
def main(argv):
    if os.environ.get("RANK", "0") in {ranks!r}:
        raise {kind}("rank " + os.environ.get("RANK", "0") + " refuses")
    import time; time.sleep(60)
sys.exit(run_worker(main))
"""


def test_a_worker_error_ends_the_job_at_once_and_is_raised_by_the_launcher(tmp_path):
    code = FAILING_WORKER.format(kind="UsageError", ranks=("0",))
    started = time.monotonic()
    with pytest.raises(UsageError, match="^rank 0 refuses$"):
        launch.run(launch.LaunchPlan((sys.executable, "-c", code), {}), run_dir=tmp_path)
    # Well before the worker's own fallback exit: the launcher read the report and ended the job.
    assert time.monotonic() - started < 20


def test_without_a_launcher_a_worker_error_is_one_line_and_exit_2():
    code = FAILING_WORKER.format(kind="EnvironmentProblem", ranks=("0",))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "error: rank 0 refuses\n"


@pytest.mark.slow
def test_errors_in_torchrun_workers_come_back_as_one_line(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER.format(kind="EnvironmentProblem", ranks=("1",)))
    wrapper = textwrap.dedent(f"""
        import sys
        from recnext_cli import launch
        from recnext_cli.errors import RecnextError
        plan = launch.LaunchPlan((sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "2", {str(script)!r}), {{}})
        try:
            launch.run(plan, run_dir=__import__("pathlib").Path({str(tmp_path)!r}))
        except RecnextError as exc:
            print(type(exc).__name__, exc, file=sys.stderr)
            sys.exit(2)
    """)
    # OMP_NUM_THREADS set, as recnext sets it for CPU workers: torchrun prints a banner about it otherwise.
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    # Neither torchrun's failure summary nor any traceback: the job ended before either could be printed.
    assert [line for line in proc.stderr.splitlines() if line.strip()] == ["EnvironmentProblem rank 1 refuses"]


def test_metrics_json_round_trips_into_recnext_results(tmp_path):
    from recnext_cli import results
    from recnext_cli.results import evaluation_document
    from recnext_cli.runners.test import write_json

    metrics = {"bbox_mAP": 0.417, "bbox_mAP_50": 0.634, "bbox_mAP_75": 0.454, "segm_mAP": 0.386,
               "segm_mAP_50": 0.605, "segm_mAP_75": 0.414, "bbox_mAP_copypaste": "0.417 0.634 …"}
    out = tmp_path / "r.json"
    write_json(out, evaluation_document("m3", metrics, "/c.pth", "/cfg.py"))
    document = json.loads(out.read_text())
    assert "bbox_mAP_copypaste" not in document["metrics"] and document["checkpoint"] == "/c.pth"
    row = results.markdown_table([results.read_result_file(out)]).splitlines()[-1]
    assert row.startswith("| RecNeXt-M3 | 41.7 | 63.4 | 45.4 | 38.6 | 60.5 | 41.4 |")


def test_each_run_writes_its_metrics_through_a_temporary_file_of_its_own(tmp_path):
    from recnext_cli.runners.test import write_json

    out = tmp_path / "r.json"
    elsewhere = tmp_path / "r.json.part"  # the one temporary name every run used to share
    elsewhere.write_text("another run, half written")
    write_json(out, {"model": "m3"})
    assert json.loads(out.read_text()) == {"model": "m3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.json.part"]
    assert elsewhere.read_text() == "another run, half written"


class _RunnerWritingInPieces:
    """Writes a checkpoint in two pieces, as a large torch.save does; `crash` stops it between them."""

    epoch = 0
    crash = False

    def save_checkpoint(self, out_dir, filename_tmpl="epoch_{}.pth", create_symlink=True):
        path = Path(out_dir) / filename_tmpl.format(self.epoch + 1)
        with open(path, "wb") as file:
            file.write(b"first half ")
            if self.crash:
                raise KeyboardInterrupt
            file.write(b"second half")
        if create_symlink:
            (Path(out_dir) / "latest.pth").unlink(missing_ok=True)
            (Path(out_dir) / "latest.pth").symlink_to(path.name)


def test_checkpoints_appear_complete_or_not_at_all(tmp_path):
    from recnext_cli.runners.train import AtomicCheckpointMixin

    runner = type("AtomicRunner", (AtomicCheckpointMixin, _RunnerWritingInPieces), {})()
    runner.save_checkpoint(str(tmp_path))
    assert (tmp_path / "epoch_1.pth").read_bytes() == b"first half second half"
    runner.epoch, runner.crash = 1, True
    with pytest.raises(KeyboardInterrupt):
        runner.save_checkpoint(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pth", "latest.pth"]
    assert os.readlink(tmp_path / "latest.pth") == "epoch_1.pth"
    runner.crash = False
    runner.save_checkpoint(str(tmp_path), filename_tmpl="iter_{}.pth")
    assert os.readlink(tmp_path / "latest.pth") == "iter_2.pth"
    assert (tmp_path / "iter_2.pth").read_bytes() == b"first half second half"


def test_unknown_metrics_are_refused_before_anything_starts():
    result = CliRunner().invoke(app, ["test", "m3", "--device", "cpu", "--eval", "bbox", "mAP", "--dry-run"])
    assert isinstance(result.exception, UsageError)
    assert str(result.exception) == "--eval mAP: COCO metrics are bbox, segm, proposal, proposal_fast"
