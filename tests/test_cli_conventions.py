"""`recnext --version` with the installed stack, and shell completion installed and answering in a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recnext_cli import __version__
from recnext_cli.cli import app
from recnext_cli.commands import version

RECNEXT = Path(sys.executable).with_name("recnext")
needs_script = pytest.mark.skipif(not RECNEXT.is_file(), reason=f"no installed `recnext` script at {RECNEXT}")
HEAVY = ("torch", "torchvision", "mmcv", "mmdet")


def _metadata_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None


def test_version_lists_the_stack_read_from_package_metadata_without_importing_it():
    code = (
        "import sys; from typer.testing import CliRunner; from recnext_cli.cli import app\n"
        "result = CliRunner().invoke(app, ['--version'])\n"
        "print(result.output, end=''); print('loaded:', ','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    *lines, loaded = out.splitlines()
    assert loaded == "loaded: "
    assert lines[0].startswith(f"recnext {__version__} (Python {sys.version.split()[0]})")
    listed = dict(line.split(maxsplit=1) for line in lines[1:])
    assert list(listed) == ["torch", "torchvision", "mmcv", "mmdet"]
    for package, distributions in version.STACK:
        expected = _metadata_version(*distributions)
        assert listed[package] == (expected or "not installed (`recnext setup` installs it)")


def test_version_reports_what_the_metadata_says_not_what_an_import_would(tmp_path):
    # A distribution's metadata found first on sys.path wins; importing mmdet would still give the real one.
    dist_info = tmp_path / "mmdet-9.8.7.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmdet\nVersion: 9.8.7\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "recnext_cli", "--version"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "mmdet        9.8.7" in done.stdout.splitlines()


def test_a_package_that_is_not_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(version, "STACK", (("torch", ("recnext-test-no-such-distribution",)),))
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.splitlines()[1] == "torch  not installed (`recnext setup` installs it)"


@needs_script
def test_completion_answers_sub_commands_and_options():
    def complete(*words: str) -> list[str]:
        env = {**os.environ, "_RECNEXT_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(["recnext", *words]),
               "COMP_CWORD": str(len(words))}
        done = subprocess.run([str(RECNEXT)], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("dow") == ["download"]
    assert complete("list", "--j") == ["--json"]


@needs_script
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_completion_writes_a_script_that_bash_runs(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    # Typer finds the shell to install for among the command's parent processes: run it from a bash (which the
    # `; exit` keeps from exec'ing the command in its own place), as a user would, whatever started the tests.
    done = subprocess.run(["bash", "-c", '"$0" --install-completion; exit $?', str(RECNEXT)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    script = tmp_path / ".bash_completions" / "recnext.sh"
    assert script.is_file()
    assert str(script) in (tmp_path / ".bashrc").read_text()
    # The installed function, called as bash calls it on <TAB> (command, word, previous word), asks the real
    # `recnext` for the candidates.
    env["PATH"] = os.pathsep.join([str(RECNEXT.parent), env.get("PATH", "")])
    probe = (f'source "{script}"; COMP_WORDS=(recnext doc); COMP_CWORD=1; _recnext_completion recnext doc recnext; '
             'echo "${COMPREPLY[@]}"')
    answered = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.split() == ["doctor"]
