"""The launch and worker rows of README's "## Errors" table, each run through the real CLI: one line, its exit code.

A row's message is a pattern: `<…>` stands for any text (paths, reasons); everything else must match exactly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recnext_cli.zoo import CONFIG_ROOT

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = CONFIG_ROOT / "demo" / "mask_rcnn_recnext_m0_shapes.py"

# Stands in for Slurm's srun: "exec" runs the task once, here, without the SLURM_* variables a real step sets;
# "elsewhere" reports success as a job whose tasks all ran on other machines would, leaving nothing on this one.
FAKE_SRUN = """\
#!{python}
import os, sys
if os.environ["FAKE_SRUN"] == "elsewhere":
    sys.exit(0)
task = next(i for i, word in enumerate(sys.argv) if i and not word.startswith("-") and "python" in word)
os.execv(sys.argv[task], sys.argv[task:])
"""


def readme_errors() -> dict[str, tuple[str, int]]:
    """input cell -> (message pattern, exit code) for every row of the README's "## Errors" table."""
    section = README.read_text().split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[2].isdigit():
            rows[cells[0]] = (_code_span(cells[1]), int(cells[2]))
    return rows


def _code_span(cell: str) -> str:
    """The text of a Markdown code span: `text`, or `` text `` when the text holds backticks itself."""
    if cell.startswith("`` ") and cell.endswith(" ``"):
        return cell[3:-3]
    if cell.startswith("`") and cell.endswith("`"):
        return cell[1:-1]
    return cell


def _pattern(message: str) -> re.Pattern:
    parts = re.split(r"<[^>]*>", message)
    return re.compile(".+".join(re.escape(part) for part in parts))


def _coco_tree(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text("{}")
        (root / split).mkdir()
    return root


def _fake_srun(directory: Path, mode: str, env: dict) -> None:
    directory.mkdir()
    srun = directory / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    env.update(PATH=f"{directory}{os.pathsep}{env['PATH']}", FAKE_SRUN=mode)


def _corrupt_checkpoint(path: Path) -> Path:
    # What a download cut mid-way leaves: the first bytes of a real zip-format checkpoint.
    import torch

    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    return path


def _needs_stack() -> None:
    pytest.importorskip("mmdet", reason="needs the mmdet stack (make setup)")


# Each row's scenario: (arguments, extra environment, what else must hold afterwards) built in a fresh folder.
def row_unknown_name_before_dataset(tmp: Path, env: dict):
    return ["test", "m33", "--device", "cpu"], None


def row_name_outside_work_dirs(tmp: Path, env: dict):
    cwd = tmp / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    (cwd / "c.py").write_text("")
    (cwd / "w.pth").write_bytes(b"")

    def nothing_outside() -> None:
        assert not (tmp / "tmp").exists() and not list(tmp.rglob("evil"))

    env["cwd"] = cwd
    return ["test", "../../../tmp/evil", "--config", "c.py", "--checkpoint", "w.pth"], nothing_outside


def row_master_port_out_of_range(tmp: Path, env: dict):
    return ["test", "m3", "--device", "cpu", "--master-port", "99999"], None


def row_srun_args_unbalanced_quote(tmp: Path, env: dict):
    return ["train", "m3", "--device", "cpu", "--srun-args", '"x'], None


def row_torch_missing(tmp: Path, env: dict):
    _coco_tree(tmp / "data" / "coco")
    env["hide_torch"] = True
    return ["test", "m3", "--device", "cpu"], None


def row_infer_missing_image(tmp: Path, env: dict):
    env.update(RECNEXT_OFFLINE="1", RECNEXT_HOME=str(tmp / "home"))

    def nothing_fetched() -> None:
        assert not (tmp / "home" / "checkpoints").exists()

    return ["infer", "m3", "missing.png"], nothing_fetched


def row_no_srun(tmp: Path, env: dict):
    _needs_stack()
    data = _coco_tree(tmp / "coco")
    env["PATH"] = os.path.dirname(sys.executable)  # this Python, and no srun
    return ["train", "tiny", "--config", str(TINY), "--launcher", "slurm", "--device", "cpu",
            "--data-root", str(data)], None


def row_runner_outside_slurm(tmp: Path, env: dict):
    _needs_stack()
    data = _coco_tree(tmp / "coco")
    _fake_srun(tmp / "bin", "exec", env)
    return ["train", "tiny", "--config", str(TINY), "--launcher", "slurm", "--device", "cpu",
            "--data-root", str(data), "--work-dir", str(tmp / "w")], None


def row_metrics_elsewhere(tmp: Path, env: dict):
    _needs_stack()
    data = _coco_tree(tmp / "coco")
    (tmp / "w.pth").write_bytes(b"")
    _fake_srun(tmp / "bin", "elsewhere", env)
    return ["test", "tiny", "--config", str(TINY), "--checkpoint", str(tmp / "w.pth"), "--launcher", "slurm",
            "--device", "cpu", "--data-root", str(data), "--out", str(tmp / "out.json")], None


def _shapes(tmp: Path) -> Path:
    from recnext_cli.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp / "shapes", train_images=4, val_images=4).root


def row_corrupt_checkpoint_in_two_workers(tmp: Path, env: dict):
    _needs_stack()
    checkpoint = _corrupt_checkpoint(tmp / "torn.pth")
    return ["test", "tiny", "--config", str(TINY), "--checkpoint", str(checkpoint), "--gpus", "2", "--device", "cpu",
            "--data-root", str(_shapes(tmp)), "--out", str(tmp / "out.json")], None


def row_backbone_refuses_in_two_workers(tmp: Path, env: dict):
    _needs_stack()
    # The tiny config has init_cfg=None: _delete_ replaces it instead of merging into it.
    return ["train", "tiny", "--config", str(TINY), "--gpus", "2", "--device", "cpu", "--data-root", str(_shapes(tmp)),
            "--work-dir", str(tmp / "w"), "--cfg-options", "model.backbone.init_cfg._delete_=True",
            "model.backbone.init_cfg.type=Pretrained"], None


def row_cfg_options_the_config_refuses(tmp: Path, env: dict):
    _needs_stack()
    return ["train", "tiny", "--config", str(TINY), "--gpus", "2", "--device", "cpu", "--data-root", str(_shapes(tmp)),
            "--work-dir", str(tmp / "w"), "--cfg-options", "model.backbone.init_cfg.type=Pretrained"], None


def row_infer_corrupt_checkpoint(tmp: Path, env: dict):
    _needs_stack()
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 200)).save(tmp / "image.png")
    checkpoint = _corrupt_checkpoint(tmp / "torn.pth")
    return ["infer", "tiny", str(tmp / "image.png"), "--config", str(TINY), "--checkpoint", str(checkpoint),
            "--device", "cpu", "--out", str(tmp / "drawn")], None


# Real workers: each starts torch and mmdet, so these take seconds each.
SLOW_ROWS = {
    "`recnext test … --checkpoint torn.pth --gpus 2` (a file cut short)": row_corrupt_checkpoint_in_two_workers,
    "`recnext train … --gpus 2` whose backbone asks for a pretrain that is not set": row_backbone_refuses_in_two_workers,
    "`recnext infer … --checkpoint torn.pth`": row_infer_corrupt_checkpoint,
    "`recnext train … --cfg-options model.backbone.init_cfg.type=Pretrained` (the config has `init_cfg=None`)":
        row_cfg_options_the_config_refuses,
}

ROWS = {
    "`recnext test m33 --device cpu` (no dataset at data/coco)": row_unknown_name_before_dataset,
    "`recnext test ../../../tmp/evil --config c.py --checkpoint w.pth`": row_name_outside_work_dirs,
    "`recnext test m3 --master-port 99999`": row_master_port_out_of_range,
    "`recnext train m3 --srun-args '\"x'`": row_srun_args_unbalanced_quote,
    "`recnext test m3` where torch is not installed": row_torch_missing,
    "`recnext infer m3 missing.png`": row_infer_missing_image,
    "`recnext train … --launcher slurm` where srun is not installed": row_no_srun,
    "a worker started by srun without Slurm's task variables": row_runner_outside_slurm,
    "`recnext test … --launcher slurm` whose rank 0 wrote `--out` on a disk this machine does not see": row_metrics_elsewhere,
}


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    hide_torch = env.pop("hide_torch", False)
    if hide_torch:
        # A None entry in sys.modules makes both `import torch` and importlib's find_spec see no torch.
        code = "import sys; sys.modules['torch'] = None; from recnext_cli.cli import main; sys.argv[0] = 'recnext'; main()"
        command = [sys.executable, "-c", code, *args]
    else:
        command = [sys.executable, "-m", "recnext_cli", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def check_row(key: str, scenario, tmp_path: Path) -> None:
    rows = readme_errors()
    assert key in rows, f"README's Errors table has no row {key!r}"
    message, exit_code = rows[key]
    env = {**os.environ, "RECNEXT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    args, afterwards = scenario(tmp_path, env)
    cwd = env.pop("cwd", tmp_path)
    result = run_cli(args, env, cwd)
    assert result.returncode == exit_code, result.stderr[-3000:]
    # One error line, last, for the whole job, however many workers it had; before it at most the launcher's own
    # progress lines ("starting 2 cpu worker(s) …"), never a traceback.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip("\n").endswith(errors[0]), result.stderr[-3000:]
    assert _pattern(message).fullmatch(errors[0]), f"{errors[0]!r} does not match the README's {message!r}"
    if afterwards:
        afterwards()


@pytest.mark.parametrize("key", list(ROWS))
def test_readme_error_row(key, tmp_path):
    check_row(key, ROWS[key], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(SLOW_ROWS))
def test_readme_error_row_raised_inside_workers(key, tmp_path):
    check_row(key, SLOW_ROWS[key], tmp_path)


def test_the_readme_pattern_reader_sees_placeholders_and_literal_text():
    assert _pattern("error: <path> lacks x").fullmatch("error: /a b/c lacks x")
    assert not _pattern("error: <path> lacks x").fullmatch("error: /a lacks y")
    assert _code_span("`` a `b` c ``") == "a `b` c" and _code_span("`plain`") == "plain"
