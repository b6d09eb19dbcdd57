"""The cache refuses what could make recnext write through links or trust files others control: planted symbolic
links, directories other users can write, damaged manifests, a RECNEXT_HOME that is a file, a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from httpserver import FileServer, checkpoint_bytes
from test_errors_table import _pattern as readme_pattern
from test_errors_table import readme_errors
from recnext_cli import cache, fetch, zoo
from recnext_cli.fetch import transport
from recnext_cli.errors import IntegrityError, UsageError

M3 = zoo.get_checkpoint("m3")
GOOD = checkpoint_bytes("m3", "coco", pad=300_000)


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECNEXT_OFFLINE", raising=False)
    monkeypatch.setattr(transport, "BACKOFF_SECONDS", 0.001)
    return tmp_path / "home"


@pytest.fixture
def server(home, monkeypatch):
    with FileServer({f"/{M3.release_tag}/{M3.file_name}": GOOD}) as files:
        monkeypatch.setenv("RECNEXT_BASE_URL", files.url)
        yield files


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def entry(suffix: str = "") -> Path:
    path = cache.checkpoint_path(M3.file_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + suffix)


@pytest.mark.parametrize("suffix", [".part", ".part.json", ".lock", ""])
def test_a_planted_link_is_refused_and_its_target_untouched(server, victim, suffix):
    link = entry(suffix)
    link.symlink_to(victim)
    with pytest.raises(IntegrityError, match="is a symbolic link; recnext never follows links"):
        fetch.ensure_file(M3)
    assert victim.read_text() == "precious\n"
    assert link.is_symlink() and os.readlink(link) == str(victim)
    assert not cache.checkpoint_path(M3.file_name).is_file() or suffix == ""
    assert server.log == []


def test_a_planted_link_to_a_checkpoint_is_not_read_or_trusted(server, tmp_path):
    elsewhere = tmp_path / "elsewhere.pth"
    elsewhere.write_bytes(GOOD)
    entry().symlink_to(elsewhere)
    state = fetch.verify_cached(M3)
    assert state.status == fetch.FAILED and "symbolic link" in state.detail
    assert fetch.cached_state(M3).status == fetch.FAILED
    assert cache.recorded(M3.file_name) is None


def test_a_hard_linked_part_is_refused(server, victim):
    os.link(victim, entry(".part"))
    with pytest.raises(IntegrityError, match="not a plain file of its own"):
        fetch.ensure_file(M3)
    assert victim.read_text() == "precious\n"


def test_a_manifest_link_is_refused(server, victim):
    entry("").with_name("manifest.json").symlink_to(victim)
    with pytest.raises(IntegrityError, match="manifest.json is a symbolic link"):
        fetch.ensure_file(M3)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_cache_directory_others_can_write_is_refused(server, mode):
    directory = entry("").parent
    directory.chmod(mode)
    with pytest.raises(UsageError, match=f"{directory} is writable by other users.*chmod go-w"):
        fetch.ensure_file(M3)
    assert server.log == [] and list(directory.iterdir()) == []


def test_an_ancestor_others_can_write_is_refused_unless_sticky(server, home):
    home.parent.chmod(0o777)
    with pytest.raises(UsageError, match="writable by other users"):
        fetch.ensure_file(M3)
    home.parent.chmod(0o1777)  # like /tmp: others may add entries but not replace ours
    assert fetch.ensure_file(M3).read_bytes() == GOOD


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_directory_of_another_user_is_refused(server):
    directory = entry("").parent
    os.chown(directory, 12345, 12345)
    with pytest.raises(UsageError, match=r"belongs to another user \(uid 12345\)"):
        fetch.ensure_file(M3)


def test_created_directories_are_private_whatever_the_umask(server, home):
    previous = os.umask(0o002)
    try:
        fetch.ensure_file(M3)
    finally:
        os.umask(previous)
    for directory in (home, home / "checkpoints"):
        assert directory.stat().st_mode & 0o022 == 0


def test_recnext_home_that_is_a_file_is_refused(server, home):
    home.write_text("not a directory")
    with pytest.raises(UsageError, match=f"the cache location {home} is a file, not a directory"):
        fetch.ensure_file(M3)
    assert home.read_text() == "not a directory"


def test_recnext_home_below_a_file_is_refused(server, home, monkeypatch):
    home.write_text("not a directory")
    monkeypatch.setenv("RECNEXT_HOME", str(home / "deeper"))
    with pytest.raises(UsageError, match=f"{home} is a file, not a directory"):
        fetch.ensure_file(M3)


@pytest.mark.parametrize("content, complaint", [
    ('{"files": []}', "'files' is a list, not an object"),
    ('[]', "its top level is a list"),
    ('{"files": {"recnext_m3_coco.pth": {"sha256": 5, "size": 1}}}', "the sha256 of 'recnext_m3_coco.pth' is 5"),
    ('{"files": {"recnext_m3_coco.pth": {"sha256": "' + "a" * 64 + '", "size": "1"}}}', "the size of .* is '1'"),
    ('{"files": {"recnext_m3_coco.pth": {"sha256": "' + "a" * 64 + '", "size": true}}}', "the size of .* is True"),
    ('{"files": {"recnext_m3_coco.pth": 7}}', "the entry of 'recnext_m3_coco.pth' is a number"),
    ('{"version": 9, "files": {}}', "version 9"),
    ('{"files": ', "Expecting value"),
    ('\udcff', "utf-8"),
])
def test_a_damaged_manifest_is_one_error_and_is_left_as_it_is(server, content, complaint):
    manifest = cache.manifest_path()
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(content.encode("utf-8", "surrogateescape"))
    before = manifest.read_bytes()
    with pytest.raises(IntegrityError, match=f"manifest {manifest} is damaged \\(.*{complaint}"):
        fetch.ensure_file(M3)
    with pytest.raises(IntegrityError, match="delete it and run `recnext verify`"):
        cache.recorded(M3.file_name)
    assert manifest.read_bytes() == before
    assert not cache.checkpoint_path(M3.file_name).exists()


def test_a_manifest_from_before_first_seen_was_kept_still_reads(server):
    manifest = cache.manifest_path()
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"version": 1, "files": {M3.file_name: {"sha256": "b" * 64, "size": 3}}}))
    assert cache.recorded(M3.file_name) == cache.Record("b" * 64, 3)


RUN_CLI = textwrap.dedent(
    """
    import resource, signal, sys
    limit = int(sys.argv[1])
    if limit:
        # What a full disk does to a writer: the write fails part-way (here EFBIG instead of ENOSPC).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if sys.argv[2] == "no-torch":
        sys.modules["torch"] = None  # any import of torch now fails
    sys.argv = ["recnext", *sys.argv[3:]]
    from recnext_cli.cli import main
    main()
    """
)


def run_cli(*args: str, limit: int = 0, torch: str = "torch") -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # one line is one line, not a terminal-width wrap
    return subprocess.run([sys.executable, "-c", RUN_CLI, str(limit), torch, *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_a_full_disk_is_one_line_and_the_received_bytes_resume(server):
    full = run_cli("download", "m3", limit=400_000)
    assert full.returncode == 2, full.stderr
    [line] = full.stderr.strip().splitlines()
    message, exit_code = readme_errors()["a full or read-only disk during `recnext download m3`"]
    assert full.returncode == exit_code and readme_pattern(message).fullmatch(line), line
    assert "File too large" in line
    part = entry(".part")
    kept = part.stat().st_size
    assert 0 < kept <= 400_000 and GOOD.startswith(part.read_bytes())
    assert not cache.checkpoint_path(M3.file_name).exists()
    done = run_cli("download", "m3")
    assert done.returncode == 0, done.stderr
    assert cache.checkpoint_path(M3.file_name).read_bytes() == GOOD
    assert server.log[-1].range_start == kept


def test_download_and_verify_need_no_torch(server):
    done = run_cli("download", "m3", torch="no-torch")
    assert done.returncode == 0, done.stderr
    assert cache.checkpoint_path(M3.file_name).read_bytes() == GOOD
    verified = run_cli("verify", "m3", "--json", torch="no-torch")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["files"][0]["status"] == "verified"


def test_a_wrong_checkpoint_is_refused_without_torch_too(server):
    server.files[f"/{M3.release_tag}/{M3.file_name}"] = checkpoint_bytes("a3", "coco")
    done = run_cli("download", "m3", torch="no-torch")
    assert done.returncode == 2
    assert cache.checkpoint_path(M3.file_name).parent.iterdir() and not cache.checkpoint_path(M3.file_name).exists()
    assert done.stderr.strip().splitlines() == [
        "error: recnext_m3_coco.pth does not hold a RecNeXt-M3 coco checkpoint: it holds a RecNeXt-A3 backbone"
    ]

