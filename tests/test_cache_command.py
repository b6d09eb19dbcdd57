"""`recnext cache ls / rm / clean` on a real cache folder: sizes, what is stale, links never followed, locks respected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recnext_cli import stack
from recnext_cli.cli import app
from recnext_cli.errors import UsageError

runner = CliRunner()
M3 = "recnext_m3_coco.pth"
A3_PRETRAIN = "recnext_a3_distill_300e.pth"
HOUR = 3600


def invoke(*args: str):
    return runner.invoke(app, list(args))


def write(path: Path, size: int, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def wheel(root: Path, slug: str, torch: str, flavour: str, python_tag: str, size: int = 1000) -> Path:
    folder = root / "wheels" / slug
    write(folder / "mmcv-1.7.2-any.whl", size)
    key = {"mmcv": stack.MMCV_VERSION, "torch": torch, "flavour": flavour, "python_tag": python_tag}
    (folder / "build.json").write_text(json.dumps(key))
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    root.mkdir(mode=0o755)
    monkeypatch.setenv("RECNEXT_HOME", str(root))
    return root


@pytest.fixture
def filled(home) -> Path:
    """A cache with one of everything: kept entries and stale leftovers."""
    checkpoints = home / "checkpoints"
    checkpoints.mkdir(mode=0o755)
    write(checkpoints / M3, 5000)
    write(checkpoints / "manifest.json", 100)
    write(checkpoints / f"{A3_PRETRAIN}.part", 3000)  # a stopped download, resumable
    write(checkpoints / f"{A3_PRETRAIN}.part.json", 50)
    write(checkpoints / f"{M3}.0123456789ab.part", 700, age_s=HOUR)  # its writer was killed an hour ago
    write(checkpoints / f"{M3}.fedcba987654.part", 800)  # a download writing right now
    write(checkpoints / f"{M3}.lock", 0)
    write(checkpoints / "notes.txt", 10)
    torch = metadata.version("torch") if _has_torch() else stack.TORCH_VERSION
    wheel(home, "mmcv-1.7.2_python", "any", stack.PYTHON_ONLY, "py3", 900)
    wheel(home, "mmcv-full-current", torch, "cpu", stack.python_tag(), 2000)
    wheel(home, "mmcv-full-old", "1.13.1", "cpu", stack.python_tag(), 4000)
    write(home / "logs" / "setup-1.log", 200)
    return home


def _has_torch() -> bool:
    try:
        metadata.version("torch")
        return True
    except metadata.PackageNotFoundError:
        return False


def listing() -> dict[str, dict]:
    result = invoke("cache", "ls", "--json")
    assert result.exit_code == 0, result.output
    return {entry["name"]: entry for entry in json.loads(result.output)["entries"]}


STALE = {
    f"checkpoints/{M3}.0123456789ab.part",
    f"checkpoints/{M3}.lock",
    "wheels/mmcv-full-old",
}


def test_ls_json_lists_every_entry_with_its_size_and_what_is_stale(filled):
    result = invoke("cache", "ls", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert (document["schema"], document["schema_version"]) == ("recnext.cache", 1)
    assert document["root"] == str(filled.resolve())
    entries = {entry["name"]: entry for entry in document["entries"]}
    assert set(entries) == {
        f"checkpoints/{M3}", "checkpoints/manifest.json", f"checkpoints/{A3_PRETRAIN}.part",
        f"checkpoints/{M3}.0123456789ab.part", f"checkpoints/{M3}.fedcba987654.part", f"checkpoints/{M3}.lock",
        "checkpoints/notes.txt", "wheels/mmcv-1.7.2_python", "wheels/mmcv-full-current", "wheels/mmcv-full-old", "logs",
    }
    assert {name for name, entry in entries.items() if entry["stale"]} == STALE
    assert entries[f"checkpoints/{M3}"]["size_bytes"] == 5000
    assert entries[f"checkpoints/{M3}"]["note"] == "RecNeXt-M3 COCO detector"
    # A .part and its sidecar are one entry.
    assert entries[f"checkpoints/{A3_PRETRAIN}.part"]["size_bytes"] == 3050
    build_json = filled / "wheels" / "mmcv-full-old" / "build.json"
    assert entries["wheels/mmcv-full-old"]["size_bytes"] == 4000 + len(build_json.read_bytes())
    assert "built for torch 1.13.1" in entries["wheels/mmcv-full-old"]["stale"]
    assert document["total_bytes"] == sum(entry["size_bytes"] for entry in entries.values())


def test_ls_table_shows_sizes_and_what_clean_would_free(filled):
    result = runner.invoke(app, ["cache", "ls"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if f"checkpoints/{M3} " in line)
    assert "checkpoint" in line and "4.9 KiB" in line
    stale_bytes = 700 + 4000 + len((filled / "wheels/mmcv-full-old/build.json").read_bytes())
    assert f"`recnext cache clean` would free {stale_bytes / 1024:.1f} KiB" in result.output


def test_clean_dry_run_removes_nothing_then_clean_removes_exactly_the_stale_entries(filled):
    before = sorted(path for path in filled.rglob("*"))
    dry = invoke("cache", "clean", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert sorted(path for path in filled.rglob("*")) == before
    assert {line.split()[2] for line in dry.output.splitlines() if line.startswith("would remove")} == STALE

    done = invoke("cache", "clean")
    assert done.exit_code == 0, done.output
    assert set(listing()) == {
        f"checkpoints/{M3}", "checkpoints/manifest.json", f"checkpoints/{A3_PRETRAIN}.part",
        f"checkpoints/{M3}.fedcba987654.part", "checkpoints/notes.txt", "wheels/mmcv-1.7.2_python",
        "wheels/mmcv-full-current", "logs",
    }
    assert (filled / "checkpoints" / f"{A3_PRETRAIN}.part.json").is_file()
    assert invoke("cache", "clean").output.startswith("nothing to remove")


def test_expired_or_unresumable_partial_downloads_are_stale(home):
    checkpoints = home / "checkpoints"
    write(checkpoints / f"{M3}.part", 10, age_s=8 * 24 * HOUR)
    write(checkpoints / f"{M3}.part.json", 10, age_s=8 * 24 * HOUR)
    write(checkpoints / f"{A3_PRETRAIN}.part", 10)  # no sidecar: which version its bytes are is unknown
    write(checkpoints / "recnext_x9_coco.pth.part", 10)
    write(checkpoints / "recnext_m4_coco.pth.part.json", 10, age_s=HOUR)  # its .part is gone
    stale = {name: entry["stale"] for name, entry in listing().items()}
    assert "older than 7 days" in stale[f"checkpoints/{M3}.part"]
    assert "cannot resume" in stale[f"checkpoints/{A3_PRETRAIN}.part"]
    assert "no file of the zoo" in stale["checkpoints/recnext_x9_coco.pth.part"]
    assert "gone" in stale["checkpoints/recnext_m4_coco.pth.part.json"]
    assert invoke("cache", "clean").exit_code == 0
    assert list(checkpoints.iterdir()) == []


def test_links_are_removed_as_links_and_what_they_point_to_survives(home, tmp_path):
    outside = tmp_path / "outside"
    write(outside / "precious.pth", 123)
    write(outside / "folder" / "keep.txt", 5)
    (home / "checkpoints").mkdir(mode=0o755)
    (home / "wheels").mkdir()
    (home / "checkpoints" / M3).symlink_to(outside / "precious.pth")
    (home / "wheels" / "mmcv-full-linked").symlink_to(outside / "folder")
    (home / "logs").symlink_to(outside / "folder")
    stale = {name for name, entry in listing().items() if entry["stale"]}
    assert stale == {f"checkpoints/{M3}", "wheels/mmcv-full-linked", "logs"}

    assert invoke("cache", "rm", "m3").exit_code == 0
    assert invoke("cache", "clean").exit_code == 0
    assert sorted(path.relative_to(home).as_posix() for path in home.rglob("*")) == ["checkpoints", "wheels"]
    assert (outside / "precious.pth").read_bytes() == b"x" * 123
    assert (outside / "folder" / "keep.txt").is_file()


def test_a_link_inside_a_removed_folder_is_not_followed(home, tmp_path):
    outside = write(tmp_path / "outside" / "precious.txt", 9)
    write(home / "logs" / "setup-1.log", 10)
    (home / "logs" / "elsewhere").symlink_to(outside.parent)
    assert invoke("cache", "rm", "logs").exit_code == 0
    assert not (home / "logs").exists()
    assert outside.read_bytes() == b"x" * 9


@pytest.mark.parametrize("target", ["../outside", "/etc/passwd", "checkpoints/../../outside", ".", "m33"])
def test_rm_outside_the_cache_or_of_nothing_is_one_line_and_removes_nothing(home, tmp_path, target):
    write(tmp_path / "outside" / "keep.txt", 4)
    write(home / "checkpoints" / M3, 10)
    done = subprocess.run([sys.executable, "-m", "recnext_cli", "cache", "rm", target], capture_output=True, text=True,
                          env={**os.environ, "RECNEXT_HOME": str(home)}, timeout=60)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ")
    if target == "m33":
        assert "did you mean m3?" in line
    else:
        assert "`recnext cache ls`" in line
    assert (tmp_path / "outside" / "keep.txt").is_file() and (home / "checkpoints" / M3).is_file()


def test_rm_a_model_takes_its_file_and_leftovers_and_keeps_the_manifest(filled):
    done = invoke("cache", "rm", "m3")
    assert done.exit_code == 0, done.output
    assert not [path for path in (filled / "checkpoints").iterdir() if path.name.startswith(M3)]
    assert (filled / "checkpoints" / "manifest.json").is_file()
    assert "freed" in done.output.splitlines()[-1]

    pretrain = invoke("cache", "rm", "a3", "--pretrain")
    assert pretrain.exit_code == 0, pretrain.output
    assert not (filled / "checkpoints" / f"{A3_PRETRAIN}.part").exists()
    assert not (filled / "checkpoints" / f"{A3_PRETRAIN}.part.json").exists()


def test_rm_dry_run_and_all(filled):
    before = sorted(filled.rglob("*"))
    assert invoke("cache", "rm", "wheels", "--dry-run").exit_code == 0
    assert sorted(filled.rglob("*")) == before
    assert invoke("cache", "rm", "wheels").exit_code == 0
    assert not list((filled / "wheels").iterdir())
    assert invoke("cache", "rm", "--all").exit_code == 0
    # The folders recnext made (with their permissions) stay, empty.
    assert sorted(path.name for path in filled.rglob("*")) == ["checkpoints", "wheels"]
    for args in (["cache", "rm"], ["cache", "rm", "m3", "--all"]):
        refused = invoke(*args)
        assert isinstance(refused.exception, UsageError) and "not both or neither" in str(refused.exception)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from filelock import FileLock
    with FileLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_an_entry_a_running_download_holds_stays(home):
    checkpoints = home / "checkpoints"
    part = write(checkpoints / f"{M3}.0123456789ab.part", 700, age_s=HOUR)
    lock = write(checkpoints / f"{M3}.lock", 0)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        entries = listing()
        assert entries[f"checkpoints/{M3}.lock"]["stale"] is None
        assert entries[f"checkpoints/{M3}.lock"]["note"] == "held by a running recnext"
        done = invoke("cache", "clean")
        assert done.exit_code == 0, done.output
        assert "kept" in done.output and "in use by another process" in done.output
        assert part.is_file() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert invoke("cache", "clean").exit_code == 0
    assert list(checkpoints.iterdir()) == []


def test_an_empty_or_missing_cache(home):
    assert "is empty" in invoke("cache", "ls").output
    assert invoke("cache", "clean").output.startswith("nothing to remove")


def test_cache_commands_load_no_heavy_framework(filled):
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from recnext_cli.cli import app
        for args in (["cache", "ls"], ["cache", "clean", "--dry-run"]):
            assert CliRunner().invoke(app, args).exit_code == 0
        print(",".join(m for m in ("torch", "torchvision", "mmcv", "mmdet") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RECNEXT_HOME": str(filled)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
