"""The CLI's fast start, version, error convention and `recnext doctor`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from recnext_cli import __version__
from recnext_cli.cli import app

HEAVY = ("torch", "torchvision", "mmcv", "mmdet")


def test_importing_the_cli_loads_no_heavy_framework():
    code = "import sys, recnext_cli.cli; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_help_lists_commands_without_heavy_imports():
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from recnext_cli.cli import app
        result = CliRunner().invoke(app, ["--help"])
        assert result.exit_code == 0, result.output
        assert "doctor" in result.output and "setup" in result.output
        print(','.join(m for m in %r if m in sys.modules))
        """ % (HEAVY,)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.splitlines()[0].startswith(f"recnext {__version__} ")


def test_library_errors_become_one_line_and_exit_2(tmp_path):
    # A user-facing error raised inside a command: no traceback, one line, exit code 2.
    code = textwrap.dedent(
        """
        import sys
        from recnext_cli import cli
        from recnext_cli.errors import DatasetLayoutError
        @cli.app.command("boom")
        def boom():
            raise DatasetLayoutError("no annotations/ in /data/coco [see the README]")
        sys.argv = ["recnext", "boom"]
        cli.main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: no annotations/ in /data/coco [see the README]"]


# The commands with --device, and the arguments each needs before it reads its options.
DEVICE_COMMANDS = {"test": ["m3"], "train": ["m3"], "infer": ["m3", "x.png"], "bench latency": []}


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_a_bad_device_is_one_line_and_exit_2_in_every_command(command):
    arguments = [*command.split(), *DEVICE_COMMANDS[command], "--device", "tpu"]
    proc = subprocess.run([sys.executable, "-m", "recnext_cli", *arguments], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --device 'tpu' is not one of cuda, cpu"]


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_every_device_option_lists_its_choices(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<cuda|cpu>" in result.output


def _doctor(env_extra: dict | None = None, pythonpath: str | None = None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "recnext_cli", "doctor", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_doctor_is_green_on_the_installed_stack(tmp_path):
    pytest.importorskip("mmdet")
    proc = _doctor({"RECNEXT_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["usable"] is True
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["mmcv"] == "ok" and status["mmdet"] == "ok" and status["torch"] == "ok"
    fixed = [c for c in report["checks"] if c["status"] == "fixed in-process"]
    assert any("MMDistributedDataParallel" in c["name"] for c in fixed)
    assert any("weights_only" in c["name"] for c in fixed)
    assert not [c for c in report["checks"] if c["status"] == "broken"]


@pytest.mark.slow
def test_doctor_reports_a_broken_mmdet_and_exits_1(tmp_path):
    shadow = tmp_path / "shadow" / "mmdet"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('simulated broken mmdet install')\n")
    proc = _doctor({"RECNEXT_HOME": str(tmp_path)}, pythonpath=str(shadow.parent))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    mmdet_row = next(c for c in report["checks"] if c["name"] == "mmdet")
    assert mmdet_row["status"] == "broken" and "simulated broken mmdet" in mmdet_row["value"]
    assert report["usable"] is False


@pytest.mark.slow
def test_a_built_wheel_ships_the_configs(tmp_path):
    # A non-editable install must still find every config the zoo names and the demo's.
    import shutil
    import zipfile

    from recnext_cli import zoo

    # From a copy of the sources: a build/ folder left in the checkout would hide files the wheel really lacks.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(zoo.PACKAGE_ROOT.parent / name, source / name)
    shutil.copytree(zoo.PACKAGE_ROOT, source / "recnext_cli", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("recnext-*.whl")

    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"recnext_cli/{zoo.get_model(name).config}" for name in zoo.DETECTION_MODELS}
    wanted.add("recnext_cli/configs/demo/mask_rcnn_recnext_m0_shapes.py")
    wanted |= {f"recnext_cli/{path.relative_to(zoo.PACKAGE_ROOT)}" for path in (zoo.CONFIG_ROOT / "_base_").rglob("*.py")}
    assert len(wanted) == 11
    assert wanted <= shipped
