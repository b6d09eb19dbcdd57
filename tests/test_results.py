"""`recnext results`: the published logs give the README's table; our test-result JSON; errors and --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recnext_cli.cli import app
from recnext_cli.errors import IntegrityError, UsageError
from recnext_cli.results import (
    HEADER,
    METRICS,
    format_percent,
    markdown_table,
    read_result_file,
    read_result_files,
    results_document,
    reported_epoch,
    evaluation_document,
)

# What the tests use of the upstream README and the six published mmdet logs, kept by
# tests/data/published/extract.py: the README's table, each run's config text and validation records.
PUBLISHED = Path(__file__).resolve().parent / "data" / "published"
README = PUBLISHED / "readme_table.md"
PUBLISHED_RUNS = json.loads((PUBLISHED / "val_metrics.json").read_text(encoding="utf-8"))
# Two README cells match no epoch of their log under any rounding (log A3 epoch 12: segm_mAP_50 0.6117;
# A5 epoch 9: bbox_mAP_75 0.4881); every other cell is the best-box-mAP epoch. Listed so that any other
# difference, or these two changing, fails.
README_CELLS_NOT_IN_LOGS = {
    ("RecNeXt-A3", "$AP_{50}^m$"): ("61.2", "61.1"),
    ("RecNeXt-A5", "$AP_{75}^b$"): ("48.8", "48.9"),
}
METRIC_COLUMNS = HEADER[1:7]


def parse_markdown_table(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The first Markdown table in `text`: its header cells and its rows keyed by their first cell."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = split[0], split[2:]
    return header, {row[0]: dict(zip(header, row)) for row in rows}


def write_log(path: Path, val_epochs: list[dict], backbone: str | None = "recnext_m3") -> Path:
    """A json log shaped like mmdet 2.x's TextLoggerHook output: a meta line, then train and val records."""
    config = f"model = dict(\n    type='MaskRCNN',\n    backbone=dict(\n        type='{backbone}',\n        depth=50))\n"
    lines = [{"env_info": "sys.platform: linux", "config": config if backbone else "", "seed": 0, "exp_name": "x.py"}]
    for epoch, metrics in enumerate(val_epochs, start=1):
        lines.append({"mode": "train", "epoch": epoch, "iter": 50, "lr": 0.0002, "loss": 1.5})
        lines.append({"mode": "val", "epoch": epoch, "iter": 625, "lr": 0.0002, **metrics})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def published_logs(directory: Path) -> list[Path]:
    """The six published runs as mmdet json logs again: the logged config and exp_name, then the val records."""
    paths = []
    for model, run in sorted(PUBLISHED_RUNS.items()):
        config = (PUBLISHED / f"recnext_{model}_coco.py").read_text(encoding="utf-8").split("\n", 1)[1]
        lines = [{"config": config, "exp_name": run["exp_name"]}, *run["val"]]
        path = directory / run["source"]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        paths.append(path)
    return paths


def metrics(box: float, **overrides: float) -> dict[str, float]:
    values = {name: 0.5 for name in METRICS}
    values["bbox_mAP"] = box
    values.update(overrides)
    return values


def test_published_logs_reproduce_the_readme_rows(tmp_path):
    readme_header, readme_rows = parse_markdown_table(README.read_text())
    ours_header, our_rows = parse_markdown_table(markdown_table(read_result_files(published_logs(tmp_path))))
    assert tuple(readme_header) == HEADER == tuple(ours_header)
    assert our_rows.keys() == readme_rows.keys()
    for model, readme_row in readme_rows.items():
        for column in METRIC_COLUMNS:
            expected = readme_row[column]
            ours, readme = README_CELLS_NOT_IN_LOGS.get((model, column), (expected, expected))
            assert readme == expected, f"README {model} {column} changed: {expected}"
            assert our_rows[model][column] == ours, f"{model} {column}"
        # Latency and checkpoint links come from the zoo, which must agree with the README.
        assert our_rows[model]["Latency"] == readme_row["Latency"]
        assert our_rows[model]["Ckpt"] == readme_row["Ckpt"]
        assert our_rows[model]["Log"].startswith(f"[{model.split('-')[1]}](")


def test_readme_is_not_the_last_epoch():
    """The rule matters: the last epoch of four of the six logs would give other numbers than the README."""
    differing = []
    for run in PUBLISHED_RUNS.values():
        val_records = run["val"]
        if reported_epoch(val_records)["epoch"] != val_records[-1]["epoch"]:
            differing.append(run["source"])
    assert len(differing) == 4, differing


@pytest.mark.parametrize(
    "fraction, shown",
    [(0.4895, "49.0"), (0.3855, "38.6"), (0.4881, "48.8"), (0.6117, "61.2"), (0.0, "0.0"), (1, "100.0")],
)
def test_percent_rounds_halves_up_from_the_logged_decimals(fraction, shown):
    assert format_percent(fraction) == shown


def test_reported_epoch_is_best_box_map_and_earliest_on_a_tie(tmp_path):
    log = write_log(tmp_path / "run.log.json", [metrics(0.30), metrics(0.41, segm_mAP=0.2), metrics(0.41), metrics(0.40)])
    record = read_result_file(log)
    assert (record.epoch, record.metrics["bbox_mAP"], record.metrics["segm_mAP"]) == (2, 0.41, 0.2)
    assert record.model == "m3" and record.name == "RecNeXt-M3" and record.config == "x.py"


def test_model_comes_from_the_config_then_the_file_name(tmp_path):
    assert read_result_file(write_log(tmp_path / "a.log.json", [metrics(0.3)], backbone="recnext_a5")).model == "a5"
    named = write_log(tmp_path / "recnext_m4_coco.log.json", [metrics(0.3)], backbone=None)
    assert read_result_file(named).model == "m4"
    other = write_log(tmp_path / "other.log.json", [metrics(0.3)], backbone="ResNet")
    assert read_result_file(other).name == "ResNet"


def test_models_the_zoo_cannot_place_get_dashes(tmp_path):
    unknown = write_log(tmp_path / "other.log.json", [metrics(0.3)], backbone="ResNet")
    classification_only = tmp_path / "m0.json"
    classification_only.write_text(json.dumps({"model": "m0", "metrics": metrics(0.3)}))
    _, rows = parse_markdown_table(markdown_table(read_result_files([unknown, classification_only])))
    assert [(row["Latency"], row["Ckpt"]) for row in rows.values()] == [("-", "-"), ("-", "-")]
    assert list(rows) == ["ResNet", "RecNeXt-M0"]


def test_evaluation_document_keeps_numeric_metrics_as_fractions_and_is_read_back(tmp_path):
    evaluated = {**metrics(0.4174, segm_mAP=0.3861), "bbox_mAP_s": 0.25,
                 "bbox_mAP_copypaste": "0.417 0.5 0.5 0.25 0.5 0.5"}
    document = evaluation_document("m3", evaluated, "ckpt.pth", "cfg.py")
    assert list(document) == ["schema", "schema_version", "model", "metrics", "checkpoint", "config"]
    assert (document["schema"], document["schema_version"]) == ("recnext.test-result", 1)
    assert document["metrics"] == {**metrics(0.4174, segm_mAP=0.3861), "bbox_mAP_s": 0.25}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(document))
    record = read_result_file(path)
    assert record.metrics["bbox_mAP"] == 0.4174 and record.metrics["segm_mAP"] == 0.3861
    assert (record.model, record.checkpoint, record.config) == ("m3", "ckpt.pth", "cfg.py")


def test_the_test_worker_writes_the_versioned_document():
    from recnext_cli.runners import test as worker

    assert worker.evaluation_document is evaluation_document


@pytest.mark.parametrize(
    "header, message",
    [
        ({"schema": "recnext.test-result", "schema_version": 2}, "newer than the 1 this recnext reads; upgrade"),
        ({"schema": "recnext.results", "schema_version": 1}, "is a 'recnext.results' document"),
        ({"schema_version": "1"}, "not a positive whole number"),
    ],
)
def test_test_results_of_another_schema_or_a_newer_version_are_refused(tmp_path, header, message):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({**header, "model": "m3", "metrics": metrics(0.4)}))
    with pytest.raises(IntegrityError, match=message):
        read_result_file(path)


def test_recnext_test_result_json(tmp_path):
    path = tmp_path / "m5_test.json"
    document = {"model": "recnext_m5", "metrics": metrics(0.4462, bbox_mAP_s=0.27), "checkpoint": "c.pth", "config": "k.py"}
    path.write_text(json.dumps(document))
    record = read_result_file(path)
    assert (record.model, record.epoch, record.checkpoint, record.config) == ("m5", None, "c.pth", "k.py")
    assert set(record.metrics) == set(METRICS)
    header, rows = parse_markdown_table(markdown_table([record]))
    assert rows["RecNeXt-M5"]["$AP^b$"] == "44.6"
    assert rows["RecNeXt-M5"]["Log"] == f"[M5]({path})"


@pytest.mark.parametrize(
    "content, error, message",
    [
        ("2024-01-01 10:00:00,000 - mmdet - INFO - Epoch [1]\n", IntegrityError, "not JSON"),
        ('{"env_info": "x"}\n{"mode": "train", "epoch": 1}\n', IntegrityError, "no validation records"),
        ('{"mode": "val", "epoch": 1, "bbox_mAP": 0.4}\n', IntegrityError, "lacks bbox_mAP_50"),
        ("[1, 2]\n", IntegrityError, "not a JSON object"),
        ('{"model": "m3", "metrics": {"bbox_mAP": 0.4}}', IntegrityError, "lacks"),
        (json.dumps({"model": "m3", "metrics": metrics(41.7)}), IntegrityError, "fractions"),
        (json.dumps({"metrics": metrics(0.4)}), IntegrityError, '"model"'),
    ],
)
def test_unreadable_files_raise_actionable_errors(tmp_path, content, error, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(error, match=message):
        read_result_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_result_file(tmp_path / "nope.log.json")


def test_command_prints_markdown_and_json(tmp_path):
    first = write_log(tmp_path / "recnext_m3_coco.log.json", [metrics(0.4174), metrics(0.40)])
    second = tmp_path / "ours.json"
    second.write_text(json.dumps({"model": "a3", "metrics": metrics(0.4208), "checkpoint": None, "config": None}))
    result = CliRunner().invoke(app, ["results", str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert result.stdout == markdown_table(read_result_files([first, second]))
    assert list(parse_markdown_table(result.stdout)[1]) == ["RecNeXt-M3", "RecNeXt-A3"]
    assert "published iPhone figure" in result.stderr

    result = CliRunner().invoke(app, ["results", "--json", str(first), str(second)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert (document["schema"], document["schema_version"]) == ("recnext.results", 1)
    rows = document["rows"]
    # Fractions as read, not the table's rounded percent: 0.4174 stays 0.4174 (the table shows 41.7).
    assert [(row["model"], row["name"], row["epoch"], row["metrics"]["bbox_mAP"]) for row in rows] == [
        ("m3", "RecNeXt-M3", 1, 0.4174),
        ("a3", "RecNeXt-A3", None, 0.4208),
    ]
    assert all(list(row["metrics"]) == list(METRICS) for row in rows)
    assert rows[0]["source"] == str(first) and rows[0]["metrics"]["segm_mAP_75"] == 0.5
    # The README's latency is published: it stays off the row measured by `recnext test`.
    assert rows[0]["latency_ms"] == 5.2 and rows[1]["latency_ms"] is None
    assert set(rows[0]) == {"model", "name", "metrics", "latency_ms", "checkpoint_url", "source", "epoch",
                            "checkpoint", "config"}


def test_a_row_measured_here_links_the_checkpoint_it_evaluated_and_no_published_latency(tmp_path):
    from recnext_cli import zoo

    mine, upstream = tmp_path / "mine.json", tmp_path / "upstream.json"
    mine.write_text(json.dumps({"model": "m3", "metrics": metrics(0.41), "checkpoint": "/w/mine.pth", "config": None}))
    cached = f"/cache/checkpoints/{zoo.MODELS['m3'].coco.file_name}"
    upstream.write_text(json.dumps({"model": "m3", "metrics": metrics(0.41), "checkpoint": cached, "config": None}))
    header, rows = parse_markdown_table(markdown_table(read_result_files([mine])))
    assert (rows["RecNeXt-M3"]["Latency"], rows["RecNeXt-M3"]["Ckpt"]) == ("-", "[M3](/w/mine.pth)")
    header, rows = parse_markdown_table(markdown_table(read_result_files([upstream])))
    assert (rows["RecNeXt-M3"]["Latency"], rows["RecNeXt-M3"]["Ckpt"]) == ("-", f"[M3]({zoo.MODELS['m3'].coco.url})")
    document = results_document(read_result_files([mine]))
    assert (document["rows"][0]["latency_ms"], document["rows"][0]["checkpoint_url"]) == (None, "/w/mine.pth")


def test_a_training_log_beside_its_checkpoints_links_its_reported_epoch(tmp_path):
    log = write_log(tmp_path / "20260101_000000.log.json", [metrics(0.30), metrics(0.41), metrics(0.40)])
    (tmp_path / "epoch_2.pth").write_bytes(b"weights")
    header, rows = parse_markdown_table(markdown_table(read_result_files([log])))
    model = next(iter(rows))
    assert rows[model]["Ckpt"].endswith(f"({tmp_path / 'epoch_2.pth'})")
    (tmp_path / "alone").mkdir()
    alone = write_log(tmp_path / "alone" / "recnext_m3_coco.log.json", [metrics(0.41)])
    header, rows = parse_markdown_table(markdown_table(read_result_files([alone])))
    assert rows["RecNeXt-M3"]["Latency"] == "5.2ms" and "github.com" in rows["RecNeXt-M3"]["Ckpt"]


def test_command_needs_a_file():
    result = CliRunner().invoke(app, ["results"])
    assert result.exit_code == 2
    assert "FILE" in result.output


def test_command_error_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "missing.log.json"
    done = subprocess.run(
        [sys.executable, "-m", "recnext_cli", "results", str(missing)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    message = f"error: {missing} does not exist; pass an mmdet *.log.json or a recnext test-result .json"
    assert done.stderr.strip().splitlines() == [message]
