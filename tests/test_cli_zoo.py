"""`recnext list`, `download` and `verify` through the real Typer app, against a local HTTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from httpserver import FileServer, checkpoint_bytes
from recnext_cli import cache, fetch, zoo
from recnext_cli.cli import app
from recnext_cli.errors import IntegrityError, UnknownModelError, UsageError

runner = CliRunner()
M3 = zoo.get_checkpoint("m3")
M3_PRETRAIN = zoo.get_checkpoint("m3", pretrain=True)


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECNEXT_OFFLINE", raising=False)
    monkeypatch.setattr(fetch, "BACKOFF_SECONDS", 0.001)
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
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert list(rows) == list(zoo.MODELS)
    m3 = rows["m3"]
    assert m3["metrics"]["box_ap"] == 41.7 and m3["metrics"]["latency_ms"] == 5.2
    assert m3["config"] == "configs/mask_rcnn_recnext_m3_fpn_1x_coco.py"
    assert m3["checkpoint"]["status"] == "verified"
    assert m3["checkpoint"]["url"] == f"{server.url}/v1.0/{M3.file_name}"
    assert m3["pretrain"]["status"] == "missing"
    assert rows["m0"]["checkpoint"] is None and rows["m0"]["metrics"] is None


def test_list_table_is_shaped_like_the_readme(server):
    result = invoke("list")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "Model" in line).split()
    assert header == ["Model", "APᵇ", "AP₅₀ᵇ", "AP₇₅ᵇ", "APᵐ", "AP₅₀ᵐ", "AP₇₅ᵐ", "Latency", "Ckpt", "Pretrain"]
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
    assert {(row["file_name"], row["status"]) for row in json.loads(everything.output)} == {
        (M3.file_name, "verified"), (M3_PRETRAIN.file_name, "verified"),
    }
    path = cache.checkpoint_path(M3.file_name)
    damaged = bytearray(path.read_bytes())
    damaged[-100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    failed = invoke("verify", "m3", "--json")
    assert failed.exit_code == 1
    [row] = json.loads(failed.output)
    assert row["status"] == "failed" and "recnext download m3 --force" in row["detail"]


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
