"""`recnext doctor`: its "fixed in-process" rows make the originally failing call, so a fix that stops working shows."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mmdet")

from recnext_cli import compat, diagnose  # noqa: E402
from recnext_cli.compat import checks  # noqa: E402
from recnext_cli.compat._util import original_of  # noqa: E402


def test_ddp_forward_check_fails_on_mmcvs_original_and_passes_patched(monkeypatch):
    from mmcv.parallel import MMDistributedDataParallel

    compat.apply_all()
    assert checks.ddp_forward() is None
    monkeypatch.setattr(MMDistributedDataParallel, "_run_ddp_forward",
                        original_of(MMDistributedDataParallel._run_ddp_forward))
    assert "_use_replicated_tensor_module" in checks.ddp_forward()


def test_checkpoint_check_fails_on_mmcvs_loader_and_on_an_unguarded_one(monkeypatch):
    from mmcv.runner.checkpoint import CheckpointLoader

    compat.apply_all()
    assert checks.checkpoint_loading() is None
    monkeypatch.setitem(CheckpointLoader._schemes, "", original_of(CheckpointLoader._schemes[""]))
    assert "Weights only load failed" in checks.checkpoint_loading()
    # A loader that accepts everything passes the numpy file but is caught by the callable one.
    monkeypatch.setitem(CheckpointLoader._schemes, "",
                        lambda filename, map_location=None: torch.load(filename, map_location, weights_only=False))
    assert "weights-only guard is off" in checks.checkpoint_loading()


def test_cpu_distributed_check_fails_on_mmdets_build_ddp_and_passes_patched(monkeypatch):
    import mmdet.utils

    compat.apply_all()
    assert checks.cpu_distributed() is None
    monkeypatch.setattr(mmdet.utils, "build_ddp", original_of(mmdet.utils.build_ddp))
    assert "Only available for cuda" in checks.cpu_distributed()


def test_a_fix_that_claims_to_be_applied_but_does_not_work_is_reported_broken(monkeypatch):
    from mmcv.parallel import MMDistributedDataParallel

    monkeypatch.setattr(MMDistributedDataParallel, "_run_ddp_forward",
                        original_of(MMDistributedDataParallel._run_ddp_forward))
    fixes = [fix for fix in compat.FIXES if fix.key == "ddp-replicated-tensor"]
    broken = [dataclasses.replace(fixes[0], apply=lambda: None, applied=lambda: True)]
    monkeypatch.setattr(compat, "FIXES", tuple(broken))
    (row,) = diagnose._fix_checks()
    assert row.status == diagnose.BROKEN and row.value.startswith("still fails: AttributeError")


def test_doctor_json_is_a_versioned_document(monkeypatch):
    from typer.testing import CliRunner

    from recnext_cli.cli import app

    found = [diagnose.Check("torch", "2.1.0", diagnose.OK), diagnose.Check("mmdet", "missing", diagnose.BROKEN, "pip …")]
    monkeypatch.setattr(diagnose, "diagnose", lambda: found)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    assert (document["schema"], document["schema_version"]) == ("recnext.doctor", 1)
    assert list(document) == ["schema", "schema_version", "usable", "checks"]
    assert document["usable"] is False
    assert document["checks"] == [{"name": "torch", "value": "2.1.0", "status": "ok", "remedy": ""},
                                  {"name": "mmdet", "value": "missing", "status": "broken", "remedy": "pip …"}]


def test_doctor_names_the_ops_provider_and_exercises_every_fix():
    env = dict(os.environ, RECNEXT_MMCV_OPS="torchvision")
    run = subprocess.run([sys.executable, "-m", "recnext_cli", "doctor", "--json"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(run.stdout)["checks"]}
    assert "torchvision" in rows["mmcv ops provider"]["value"]
    for op in ("RoIAlign forward", "RoIAlign backward", "nms", "batched_nms"):
        assert rows[op]["status"] == "ok" and "matches mmcv's published test values" in rows[op]["value"], rows[op]
    assert "RoIAlign/NMS from torchvision" in rows["mmcv"]["value"]
    fixed = [row for row in rows.values() if row["status"] == "fixed in-process"]
    assert len(fixed) >= 3 and all("the failing call now works" in row["value"] for row in fixed)
