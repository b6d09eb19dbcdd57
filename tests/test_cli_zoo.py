"""`recnext list`, `download` and `verify` through the real Typer app, against a local HTTP server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from types import MappingProxyType

import pytest
from typer.testing import CliRunner

from httpserver import Fault, FileServer, checkpoint_bytes, tls_context
from test_errors_table import _pattern as readme_pattern
from test_errors_table import readme_errors
from recnext_cli import cache, fetch, zoo
from recnext_cli.fetch import transport
from recnext_cli.cli import app
from recnext_cli.errors import IntegrityError, UnknownModelError, UsageError

runner = CliRunner()
M3 = zoo.get_checkpoint("m3")
M3_PRETRAIN = zoo.get_checkpoint("m3", pretrain=True)


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECNEXT_OFFLINE", raising=False)
    monkeypatch.setattr(transport, "BACKOFF_SECONDS", 0.001)
    files = {
        f"/v1.0/{M3.file_name}": checkpoint_bytes("m3", "coco", pad=100_000),
        f"/v1.0/{M3_PRETRAIN.file_name}": checkpoint_bytes("m3", "imagenet"),
    }
    with FileServer(files) as files_server:
        monkeypatch.setenv("RECNEXT_BASE_URL", files_server.url)
        yield files_server


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_list_json_has_metrics_urls_and_cache_state(server):
    fetch.ensure_file(M3)
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert (document["schema"], document["schema_version"]) == ("recnext.list", 1)
    assert list(document) == ["schema", "schema_version", "models"]
    rows = {row["name"]: row for row in document["models"]}
    assert list(rows) == list(zoo.MODELS)
    m3 = rows["m3"]
    # AP as fractions under mmdet's names, the unit of `recnext results --json` and of `recnext test`'s JSON.
    assert m3["metrics"] == {"bbox_mAP": 0.417, "bbox_mAP_50": 0.634, "bbox_mAP_75": 0.454,
                             "segm_mAP": 0.386, "segm_mAP_50": 0.605, "segm_mAP_75": 0.414}
    assert m3["latency_ms"] == 5.2
    assert m3["config"] == "configs/mask_rcnn_recnext_m3_fpn_1x_coco.py"
    assert m3["checkpoint"]["status"] == "verified"
    assert m3["checkpoint"]["url"] == f"{server.url}/v1.0/{M3.file_name}"
    assert m3["pretrain"]["status"] == "missing"
    assert rows["m0"]["checkpoint"] is None and rows["m0"]["metrics"] is None and rows["m0"]["latency_ms"] is None


def test_list_table_is_shaped_like_the_readme(server):
    result = invoke("list")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "Model" in line).split()
    assert header == ["Model", "APᵇ", "AP₅₀ᵇ", "AP₇₅ᵇ", "APᵐ", "AP₅₀ᵐ", "AP₇₅ᵐ", "Latency†", "Ckpt", "Pretrain"]
    a5 = next(line for line in result.output.splitlines() if "RecNeXt-A5" in line).split()
    assert a5 == ["RecNeXt-A5", "44.4", "66.3", "48.9", "40.3", "63.3", "43.4", "25.3ms", "–", "–"]


def test_download_fetches_verifies_and_then_reuses(server):
    result = invoke("download", "m3", "m3", "--pretrain")
    assert result.exit_code == 0, result.output
    assert f"{M3_PRETRAIN.file_name} downloaded and verified" in result.output
    assert f"{M3_PRETRAIN.file_name} already cached and verified" in result.output
    assert cache.checkpoint_path(M3_PRETRAIN.file_name).read_bytes() == server.files[f"/v1.0/{M3_PRETRAIN.file_name}"]
    assert not cache.checkpoint_path(M3.file_name).exists()


def test_download_force_refuses_changed_bytes_until_accepted(server):
    assert invoke("download", "m3").exit_code == 0
    server.files[f"/v1.0/{M3.file_name}"] = checkpoint_bytes("m3", "coco", seed=2)
    refused = invoke("download", "m3", "--force")
    assert isinstance(refused.exception, IntegrityError)
    assert "--accept-new-digest" in str(refused.exception)
    accepted = invoke("download", "m3", "--force", "--accept-new-digest")
    assert accepted.exit_code == 0, accepted.output
    assert cache.checkpoint_path(M3.file_name).read_bytes() == server.files[f"/v1.0/{M3.file_name}"]


@pytest.mark.parametrize("args", [(), ("m3", "--all")])
def test_download_wants_names_or_all(server, args):
    assert isinstance(invoke("download", *args).exception, UsageError)


def test_unknown_name_is_refused_before_anything_downloads(server):
    result = invoke("download", "m3", "a33")
    assert isinstance(result.exception, UnknownModelError)
    assert "did you mean a3?" in str(result.exception)
    assert server.log == []


def test_unknown_name_exits_2_with_one_line_naming_the_closest(server):
    done = subprocess.run([sys.executable, "-m", "recnext_cli", "download", "a33"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown model 'a33'; did you mean a3? valid: m3, m4, m5, a3, a4, a5, m0, m1, m2, a0, a1, a2"
    ]


def test_verify_checks_named_and_all_cached_files(server):
    missing = invoke("verify", "m3")
    assert missing.exit_code == 1 and "missing" in missing.output
    assert invoke("download", "m3").exit_code == 0
    assert invoke("download", "m3", "--pretrain").exit_code == 0
    everything = invoke("verify", "--json")
    assert everything.exit_code == 0, everything.output
    assert {(row["file_name"], row["status"]) for row in json.loads(everything.output)["files"]} == {
        (M3.file_name, "verified"), (M3_PRETRAIN.file_name, "verified"),
    }
    path = cache.checkpoint_path(M3.file_name)
    damaged = bytearray(path.read_bytes())
    damaged[-100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    failed = invoke("verify", "m3", "--json")
    assert failed.exit_code == 1
    [row] = json.loads(failed.output)["files"]
    assert row["status"] == "failed" and "recnext download m3 --force" in row["detail"]


def test_verify_json_is_a_versioned_document(server):
    assert invoke("download", "m3").exit_code == 0
    result = invoke("verify", "m3", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert (document["schema"], document["schema_version"]) == ("recnext.verify", 1)
    assert list(document) == ["schema", "schema_version", "files"]
    [row] = document["files"]
    assert list(row) == ["model", "kind", "file_name", "path", "status", "trust", "detail"]
    assert (row["model"], row["kind"], row["file_name"]) == ("m3", M3.kind, M3.file_name)
    assert row["path"] == str(cache.checkpoint_path(M3.file_name)) and row["status"] == "verified"
    # Nothing cached is still a document, with no files.
    cache.checkpoint_path(M3.file_name).unlink()
    empty = json.loads(invoke("verify", "--json").output)
    assert (empty["schema"], empty["files"]) == ("recnext.verify", [])


def test_verify_with_nothing_cached_succeeds(server):
    result = invoke("verify")
    assert result.exit_code == 0 and "nothing cached" in result.output


def test_list_and_download_of_a_cached_file_import_no_torch(server):
    fetch.ensure_file(M3)
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from recnext_cli.cli import app
        for args in (["list"], ["download", "m3"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
        print(",".join(name for name in ("torch", "mmcv", "mmdet") if name in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def pin_zoo(monkeypatch, checkpoint: zoo.Checkpoint) -> None:
    """Use a zoo whose table pins `checkpoint` (the data a pasted PINS line produces)."""
    models = dict(zoo.MODELS)
    model = models[checkpoint.model]
    field = "coco" if checkpoint.kind == zoo.COCO else "pretrain"
    models[checkpoint.model] = dataclasses.replace(model, **{field: checkpoint})
    monkeypatch.setattr(zoo, "MODELS", MappingProxyType(models))
    monkeypatch.setattr(zoo, "CHECKPOINTS", MappingProxyType({**zoo.CHECKPOINTS, checkpoint.file_name: checkpoint}))


def test_list_and_verify_say_first_seen_until_a_file_is_pinned(server, monkeypatch):
    assert invoke("download", "m3").exit_code == 0
    listed = invoke("list")
    assert "no file is pinned: each is trusted on first use" in listed.output
    m3_row = next(line for line in listed.output.splitlines() if "RecNeXt-M3" in line).split()
    assert m3_row[-2:] == ["✓*", "–"]
    [row] = json.loads(invoke("verify", "m3", "--json").output)["files"]
    assert (row["status"], row["trust"]) == ("verified", "first seen")
    assert row["detail"].startswith("first seen ") and row["detail"].endswith(f"from {server.url}/v1.0/{M3.file_name}")

    pinned_bytes = server.files[f"/v1.0/{M3.file_name}"]
    pin_zoo(monkeypatch, dataclasses.replace(M3, sha256=hashlib.sha256(pinned_bytes).hexdigest(), size=len(pinned_bytes)))
    listed = invoke("list")
    assert "1 of 18 files pinned" in listed.output
    assert next(line for line in listed.output.splitlines() if "RecNeXt-M3" in line).split()[-2:] == ["✓", "–"]
    [row] = json.loads(invoke("verify", "m3", "--json").output)["files"]
    assert (row["status"], row["trust"]) == ("verified", "pinned")


def test_pin_prints_lines_that_pin_the_cached_files(server, monkeypatch):
    assert invoke("download", "m3").exit_code == 0
    assert invoke("download", "m3", "--pretrain").exit_code == 0
    result = invoke("pin")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("    ")]
    pins = {}
    for line in lines:
        match = re.fullmatch(r'    "([^"]+)": Pin\("([0-9a-f]{64})", (\d+)\),', line)
        assert match, line
        pins[match.group(1)] = zoo.Pin(match.group(2), int(match.group(3)))
    assert set(pins) == {M3.file_name, M3_PRETRAIN.file_name}
    content = cache.checkpoint_path(M3.file_name).read_bytes()
    assert pins[M3.file_name] == zoo.Pin(hashlib.sha256(content).hexdigest(), len(content))
    # The pasted line makes the file pinned: other bytes for it are then refused even on a first download.
    pinned = dataclasses.replace(M3, sha256=pins[M3.file_name].sha256, size=pins[M3.file_name].size)
    pin_zoo(monkeypatch, pinned)
    assert fetch.verify_cached(pinned).trust == fetch.PINNED
    cache.checkpoint_path(M3.file_name).unlink()
    cache.manifest_path().unlink()
    server.files[f"/v1.0/{M3.file_name}"] = checkpoint_bytes("m3", "coco", seed=5, pad=100_000)
    refused = invoke("download", "m3")
    assert isinstance(refused.exception, IntegrityError) and "where the zoo pins" in str(refused.exception)


def test_pin_refuses_a_file_that_fails_its_check(server):
    assert invoke("download", "m3").exit_code == 0
    path = cache.checkpoint_path(M3.file_name)
    path.write_bytes(path.read_bytes()[:-1] + b"?")
    result = invoke("pin", "m3")
    assert result.exit_code == 1
    assert "Pin(" not in result.stdout


def test_pin_with_nothing_cached_says_so(server):
    result = invoke("pin")
    assert result.exit_code == 0 and "nothing cached" in result.output and "Pin(" not in result.output


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(30)
    """
)


def test_download_shows_it_waits_for_another_download_then_gives_up_in_one_line(server, capsys, monkeypatch):
    path = cache.checkpoint_path(M3.file_name)
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = run_main(monkeypatch, capsys, "download", "m3", "--timeout", "0.5")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert "waiting for another download of recnext_m3_coco.pth (up to 0.5 s)" in out
    assert err.startswith("error: another process has held ") and "gave up waiting" in err
    assert server.log == []


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the `recnext` entry point itself (what the console script runs): exit code, stdout, stderr."""
    from recnext_cli.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["recnext", *args])
    monkeypatch.setenv("COLUMNS", "400")  # one line is one line, not a terminal-width wrap
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _manifest(content: str):
    def setup(server, tmp_path, monkeypatch):
        manifest = cache.manifest_path()
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(content)
    return setup


def _env(name: str, value: str):
    def setup(server, tmp_path, monkeypatch):
        monkeypatch.setenv(name, value)
    return setup


def _home_is_a_file(server, tmp_path, monkeypatch):
    (tmp_path / "home").write_text("x")


def _shared_cache(server, tmp_path, monkeypatch):
    cache.checkpoints_dir().mkdir(parents=True)
    cache.checkpoints_dir().chmod(0o777)


def _other_owner(server, tmp_path, monkeypatch):
    if os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    cache.checkpoints_dir().mkdir(parents=True)
    os.chown(cache.checkpoints_dir(), 12345, 12345)


def _planted_link(server, tmp_path, monkeypatch):
    cache.checkpoints_dir().mkdir(parents=True)
    (tmp_path / "victim").write_text("x")
    cache.checkpoint_path(M3.file_name + ".part").symlink_to(tmp_path / "victim")


def _redirect_to_http(server, tmp_path, monkeypatch):
    (tmp_path / "tls").mkdir()
    context, certificate = tls_context(tmp_path / "tls")
    secure = FileServer({}, tls=context).__enter__()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
    monkeypatch.setenv("RECNEXT_BASE_URL", secure.url)
    secure.faults = [Fault(redirect=server.url)]
    return secure.__exit__


def _oversized(server, tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "MAX_DOWNLOAD_BYTES", 1000)


def _trickle(server, tmp_path, monkeypatch):
    server.chunk_delay = 0.05


def _lock_held(server, tmp_path, monkeypatch):
    path = cache.checkpoint_path(M3.file_name)
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return lambda: (holder.kill(), holder.wait())


def _different_bytes(server, tmp_path, monkeypatch):
    fetch.ensure_file(M3)
    cache.checkpoint_path(M3.file_name).unlink()
    server.files[f"/v1.0/{M3.file_name}"] = checkpoint_bytes("m3", "coco", seed=3, pad=100_000)


def _wrong_model(server, tmp_path, monkeypatch):
    server.files[f"/v1.0/{M3.file_name}"] = checkpoint_bytes("a3", "coco")


def _nothing(server, tmp_path, monkeypatch):
    pass


# The download, cache and trust rows of README.md's "## Errors" table: its input cell -> (how to make that input,
# the command line). The message and exit code come from the README row, so the table cannot drift from the code.
# A setup may return a function that undoes what it started.
ERROR_ROWS = {
    "`recnext download a33`": (_nothing, ("download", "a33")),
    "`recnext download m0`": (_nothing, ("download", "m0")),
    "`recnext download` (no name, no `--all`)": (_nothing, ("download",)),
    "`recnext download m3 --timeout soon`": (_nothing, ("download", "m3", "--timeout", "soon")),
    "`RECNEXT_DOWNLOAD_TIMEOUT=0`": (_env("RECNEXT_DOWNLOAD_TIMEOUT", "0"), ("download", "m3")),
    "`RECNEXT_BASE_URL=http://mirror.example/r`": (_env("RECNEXT_BASE_URL", "http://mirror.example/r"), ("download", "m3")),
    "`RECNEXT_BASE_URL=ftp://mirror.example/r`": (_env("RECNEXT_BASE_URL", "ftp://mirror.example/r"), ("download", "m3")),
    "`RECNEXT_HOME` names a file": (_home_is_a_file, ("download", "m3")),
    "a cache folder other users can write (`chmod 777`)": (_shared_cache, ("download", "m3")),
    "a cache folder owned by another user": (_other_owner, ("list",)),
    '`manifest.json` holding `{"files": []}`': (_manifest('{"files": []}'), ("download", "m3")),
    '`manifest.json` with `"size": "9"`': (
        _manifest('{"files": {"recnext_m3_coco.pth": {"sha256": "' + "a" * 64 + '", "size": "9"}}}'), ("download", "m3")
    ),
    "a symbolic link planted as `<name>.part`, `.lock`, `.part.json`, `manifest.json` or the file itself": (
        _planted_link, ("download", "m3")
    ),
    "a mirror that redirects from https to http": (_redirect_to_http, ("download", "m3")),
    "a body announced larger than the cap": (_oversized, ("download", "m3")),
    "a download slower than its deadline": (_trickle, ("download", "m3", "--timeout", "0.3")),
    "another process holding the file's lock past the deadline": (_lock_held, ("download", "m3", "--timeout", "0.3")),
    "an unpinned file whose bytes changed since first seen": (_different_bytes, ("download", "m3")),
    "a file that holds another model": (_wrong_model, ("download", "m3")),
    "`RECNEXT_OFFLINE=1` and the file not cached": (_env("RECNEXT_OFFLINE", "1"), ("download", "m3")),
}


@pytest.mark.parametrize("row", list(ERROR_ROWS))
def test_each_bad_input_is_its_readme_line_and_damages_nothing(server, tmp_path, monkeypatch, capsys, row):
    rows = readme_errors()
    assert row in rows, f"README's Errors table has no row {row!r}"
    message, exit_code = rows[row]
    setup, args = ERROR_ROWS[row]
    undo = setup(server, tmp_path, monkeypatch)
    before = _snapshot(tmp_path)
    try:
        code, _, err = run_main(monkeypatch, capsys, *args)
    finally:
        if undo is not None:
            undo()
    assert code == exit_code, err
    [line] = err.strip().splitlines()
    assert readme_pattern(message).fullmatch(line), f"{line!r} does not match the README's {message!r}"
    # Nothing that was there before changed, and no final file or record appeared.
    after = _snapshot(tmp_path)
    assert {name: content for name, content in after.items() if name in before} == before
    assert not {name for name in after if name not in before and not name.endswith((".lock", ".part", ".part.json"))}


def _snapshot(tmp_path) -> dict[str, bytes | str]:
    found = {}
    for path in sorted(tmp_path.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path)] = path.read_bytes()
    return found


def test_verify_and_pin_name_the_pretrain_option_they_have(server, capsys, monkeypatch):
    for command in ("verify", "pin"):
        code, _, err = run_main(monkeypatch, capsys, command, "a2")
        assert code == 2 and err.strip().endswith("ask for its ImageNet weights with --pretrain")
