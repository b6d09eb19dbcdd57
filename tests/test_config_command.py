"""`recnext config`: the merged config a training run would use, against the published M3 run's own config."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

mmcv = pytest.importorskip("mmcv", reason="mmcv-full is not installed; run `recnext setup`")
pytest.importorskip("mmdet", reason="mmdet is not installed; run `recnext setup`")

from recnext_cli.cli import app  # noqa: E402

# Copied from the first line of the published recnext_m3_coco.log.json, so this runs from a plain clone.
PUBLISHED_M3 = Path(__file__).parent / "data" / "published" / "recnext_m3_coco.py"
# Where files are on the machine that trains: the dataset, the ImageNet pretrain, the work dir.
PATHS = {"data_root", "work_dir", "data.train.ann_file", "data.train.img_prefix", "data.val.ann_file",
         "data.val.img_prefix", "data.test.ann_file", "data.test.img_prefix", "model.backbone.init_cfg.checkpoint"}
# Published only: the ResNet base config's `pretrained`, which init_cfg overrides. Ours only: makes mmdet's own
# tools register the RecNeXt backbones when they load the file.
SOURCE_ONLY = {"model.pretrained", "custom_imports.imports", "custom_imports.allow_failed_imports"}


def flat(config: dict, prefix: str = "") -> dict:
    """Dotted keys to leaf values (lists and tuples kept whole, with their type)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def loaded(text: str) -> dict:
    return flat(mmcv.Config.fromstring(text, ".py")._cfg_dict.to_dict())


def printed_config(*args: str, home: Path) -> tuple[dict, str]:
    result = CliRunner().invoke(app, ["config", *args], env={"RECNEXT_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return loaded(result.stdout), result.stderr


def test_config_m3_on_eight_gpus_is_the_published_config(tmp_path):
    ours, plan = printed_config("m3", "--gpus", "8", home=tmp_path)
    published = loaded(PUBLISHED_M3.read_text())
    differing = {key for key in set(ours) | set(published) if ours.get(key, KeyError) != published.get(key, KeyError)}
    assert differing == PATHS | SOURCE_ONLY
    assert ours["gpu_ids"] == published["gpu_ids"] == range(0, 8)
    assert "8 worker(s) x 2 image(s) x 1 accumulation step(s) = 16" in plan


def test_config_m3_on_four_gpus_accumulates_and_counts_the_schedule_in_steps(tmp_path):
    ours, plan = printed_config("m3", "--gpus", "4", home=tmp_path)
    assert (ours["optimizer_config.type"], ours["optimizer_config.accumulation"]) == ("AccumulatingOptimizerHook", 2)
    assert (ours["lr_config.policy"], ours["lr_config.accumulation"]) == ("StepCountedStep", 2)
    # Warm-up and decay epochs stay the published ones: the lr hook counts optimizer steps, not iterations.
    assert (ours["lr_config.warmup_iters"], ours["lr_config.step"], ours["optimizer.lr"]) == (500, [8, 11], 2e-4)
    assert "4 worker(s) x 2 image(s) x 2 accumulation step(s) = 16" in plan


def test_config_options_and_linear_lr_show_in_the_printed_config(tmp_path):
    ours, _ = printed_config("a3", "--gpus", "2", "--batch-policy", "linear-lr", "--cfg-options", "runner.max_epochs=3",
                             home=tmp_path)
    assert ours["runner.max_epochs"] == 3
    assert ours["optimizer.lr"] == pytest.approx(2e-4 * 4 / 16)
    assert "type" not in {key.split(".")[-1] for key in ours if key.startswith("optimizer_config")}


def test_config_written_with_out_loads_as_printed(tmp_path):
    out = tmp_path / "merged" / "m3.py"
    ours, stderr = printed_config("m3", "--gpus", "8", "--out", str(out), home=tmp_path)
    assert loaded(out.read_text()) == ours
    assert f"config written to {out}" in stderr


def test_a_worker_count_that_cannot_reach_the_batch_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["config", "m3", "--gpus", "3"], env={"RECNEXT_HOME": str(tmp_path)})
    assert result.exit_code != 0
    assert "does not divide the recipe's batch of 16" in str(result.exception)
