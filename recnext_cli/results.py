"""Results tables: read mmdet json logs or recnext test results, pick the epoch upstream reports, render its table."""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Mapping, Sequence

from recnext_cli import outputs, zoo
from recnext_cli.errors import IntegrityError, UsageError

# The six COCO numbers of the README table, by the names mmdet's CocoDataset.evaluate gives them, in column order.
METRICS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75")
# The zoo's published numbers (percent, as the README prints them) under the same names.
_ZOO_FIELDS = dict(zip(METRICS, ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")))
HEADER = (
    "Model", "$AP^b$", "$AP_{50}^b$", "$AP_{75}^b$", "$AP^m$", "$AP_{50}^m$", "$AP_{75}^m$", "Latency", "Ckpt", "Log",
)  # fmt: skip
_ALIGNMENT = (":---",) + (":---:",) * (len(HEADER) - 1)
_BACKBONE_IN_CONFIG = re.compile(r"backbone\s*=\s*dict\(\s*type\s*=\s*['\"]([\w.-]+)['\"]")
_MODEL_IN_FILE_NAME = re.compile(r"recnext[_-]([a-z]\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class ResultRecord:
    """One model's COCO numbers from one file; metrics are fractions in [0, 1] as mmdet reports them."""

    model: str
    metrics: Mapping[str, float]
    source: Path
    epoch: int | None = None
    checkpoint: str | None = None
    config: str | None = None

    @property
    def name(self) -> str:
        return display_name(self.model)


def display_name(model: str) -> str:
    """The README's spelling: 'm3' -> 'RecNeXt-M3'; names that are not RecNeXt variants stay as they are."""
    return f"RecNeXt-{model.upper()}" if re.fullmatch(r"[a-z]\d+", model) else model


def format_percent(fraction: float) -> str:
    """0.4895 -> '49.0': ×100, one decimal, halves rounded up.

    mmdet logs fractions rounded to four decimals; in binary floating point 0.4895 * 100 is 48.9499…, which
    Python would print as 48.9 where the README shows 49.0. Going through the decimal text avoids that.
    """
    return str((Decimal(repr(fraction)) * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def percent_to_fraction(percent: float) -> float:
    """41.7 -> 0.417, through the decimal text so that no binary rounding residue (0.41700000000000004) shows."""
    return float(Decimal(repr(percent)) / 100)


def published_metrics(model: zoo.Model) -> dict[str, float] | None:
    """The README's COCO results of `model` as fractions under mmdet's names; None for classification-only sizes."""
    if model.metrics is None:
        return None
    return {name: percent_to_fraction(getattr(model.metrics, field)) for name, field in _ZOO_FIELDS.items()}


def reported_epoch(val_records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The validation record the upstream README reports: the epoch with the highest box mAP.

    All six published logs agree with this rule (not with the last epoch: M4, M5, A4 and A5 peak at epoch 9 or 10),
    except two README cells that match no epoch at all (A3 segm_mAP_50, A5 bbox_mAP_75; see tests/test_results.py).
    On a tie the earliest epoch wins, as with mmdet's `save_best`, which keeps a best score unless it is exceeded.
    """
    return max(val_records, key=lambda record: record["bbox_mAP"])


def read_result_file(path: Path) -> ResultRecord:
    """Read an mmdet `*.log.json` (the reported epoch is picked) or a recnext test-result JSON.

    A recnext test result is the JSON object `evaluation_document` makes (files written before it carried a
    schema version are read too).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; pass an mmdet *.log.json or a recnext test-result .json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} ({exc}); pass an mmdet *.log.json or a recnext test-result .json") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        # A json log holds one object per line, so it is not one JSON document unless it has a single line.
        document = None
    if isinstance(document, dict) and ("metrics" in document or "schema" in document):
        return _test_result(document, path)
    return _mmdet_log(text, path)


def read_result_files(paths: Sequence[Path]) -> list[ResultRecord]:
    return [read_result_file(path) for path in paths]


def evaluation_document(model_name: str, metrics: Mapping[str, Any], checkpoint: str, config: str) -> dict[str, Any]:
    """What `recnext test` writes: {"schema": "recnext.test-result", "schema_version", "model", "metrics" (every
    numeric metric mmdet's evaluate returned, AP as fractions; its `*_copypaste` strings are left out), "checkpoint",
    "config"}."""
    numeric = {key: float(value) for key, value in metrics.items() if isinstance(value, numbers.Real)}
    return outputs.document("test-result", model=model_name, metrics=numeric, checkpoint=checkpoint, config=config)


def _test_result(document: Mapping[str, Any], path: Path) -> ResultRecord:
    outputs.check_version(document, "test-result", path)
    model, metrics = document.get("model"), document["metrics"]
    if not isinstance(model, str) or not model.strip():
        raise IntegrityError(f"{path}: a recnext test result needs a \"model\" string such as \"m3\"")
    return ResultRecord(
        model=zoo.model_key(model),
        metrics=_checked_metrics(metrics, path),
        source=path,
        checkpoint=document.get("checkpoint"),
        config=document.get("config"),
    )


def _mmdet_log(text: str, path: Path) -> ResultRecord:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise IntegrityError(
                f"{path} line {number} is not JSON: pass an mmdet *.log.json (not the .log text) "
                "or a recnext test-result .json"
            ) from None
        if not isinstance(record, dict):
            raise IntegrityError(f"{path} line {number} is not a JSON object, as mmdet json logs have on every line")
        records.append(record)
    val_records = [record for record in records if record.get("mode") == "val"]
    if not val_records:
        raise IntegrityError(
            f"{path} has no validation records (\"mode\": \"val\"): the run stopped before its first evaluation "
            "or was trained without `evaluation = dict(metric=['bbox', 'segm'])`"
        )
    for record in val_records:
        _checked_metrics(record, path)
    best = reported_epoch(val_records)
    meta = records[0] if "mode" not in records[0] else {}
    config = meta.get("config")
    return ResultRecord(
        model=_model_from_log(config, path),
        metrics={name: best[name] for name in METRICS},
        source=path,
        epoch=best.get("epoch"),
        config=meta.get("exp_name"),
    )


def _model_from_log(config: Any, path: Path) -> str:
    """The backbone type in the logged config ('recnext_m3'), else the file name, else the file's stem."""
    if isinstance(config, dict):
        backbone_type = config.get("model", {}).get("backbone", {}).get("type")
    else:
        # mmdet 2.x logs the config as Python source text (`Config.pretty_text`), not as a dict.
        match = _BACKBONE_IN_CONFIG.search(config) if isinstance(config, str) else None
        backbone_type = match.group(1) if match else None
    if isinstance(backbone_type, str) and backbone_type.lower().startswith("recnext"):
        return zoo.model_key(backbone_type)
    match = _MODEL_IN_FILE_NAME.search(path.name)
    if match:
        return match.group(1).lower()
    return backbone_type or path.name.split(".")[0]


def _checked_metrics(metrics: Any, path: Path) -> dict[str, float]:
    if not isinstance(metrics, dict):
        raise IntegrityError(f"{path}: \"metrics\" must be an object of COCO metrics such as \"bbox_mAP\"")
    missing = [name for name in METRICS if name not in metrics]
    if missing:
        raise IntegrityError(f"{path} lacks {', '.join(missing)}: evaluate with both bbox and segm metrics")
    for name in METRICS:
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise IntegrityError(f"{path}: {name} = {value!r}; metrics are fractions in [0, 1] as mmdet reports them")
    return {name: float(metrics[name]) for name in METRICS}


def _row_facts(record: ResultRecord) -> tuple[float | None, str | None, str | None]:
    """(latency in ms, checkpoint link, checkpoint) for `record`'s row, each from the row's own source.

    A training log's row is the published recipe's: the README's iPhone latency and, for a log that stands alone,
    the upstream checkpoint; a log beside the checkpoints its run wrote links its reported epoch's file instead.
    A `recnext test` row was measured here: it measured no latency, and links the upstream checkpoint only when
    that is the file it evaluated (the zoo's file name), else the file it did evaluate.
    """
    entry = zoo.MODELS.get(record.model)  # record.model is already a zoo key (zoo.model_key) where it names one
    coco = entry.coco if entry else None
    if record.epoch is None:
        checkpoint = record.checkpoint
        if coco and checkpoint and Path(checkpoint).name == coco.file_name:
            return None, coco.url, checkpoint
        return None, checkpoint, checkpoint
    latency_ms = entry.metrics.latency_ms if entry and entry.metrics else None
    written = record.source.parent / f"epoch_{record.epoch}.pth"
    if written.is_file():
        return latency_ms, str(written), str(written)
    return latency_ms, coco.url if coco else None, record.checkpoint


def results_document(records: Sequence[ResultRecord]) -> dict[str, Any]:
    """`recnext results --json`: one row per record, its six AP fractions under "metrics", and where they came from.

    "latency_ms" is the upstream README's iPhone figure, on rows read from training logs only; "checkpoint_url" is
    the link the table shows.
    """
    rows = []
    for record in records:
        latency_ms, checkpoint_url, checkpoint = _row_facts(record)
        rows.append({
            "model": record.model,
            "name": record.name,
            "metrics": {name: record.metrics[name] for name in METRICS},
            "latency_ms": latency_ms,
            "checkpoint_url": checkpoint_url,
            "source": str(record.source),
            "epoch": record.epoch,
            "checkpoint": checkpoint,
            "config": record.config,
        })
    return outputs.document("results", rows=rows)


def markdown_table(records: Sequence[ResultRecord]) -> str:
    """The upstream README's table: same header and columns, one row per record, in the given order."""
    lines = [markdown_row(HEADER), markdown_row(_ALIGNMENT)]
    for record in records:
        latency_ms, checkpoint_url, _ = _row_facts(record)
        label = record.model.upper()
        cells = [record.name, *(format_percent(record.metrics[name]) for name in METRICS)]
        cells.append(latency_cell(latency_ms))
        cells.append(f"[{label}]({checkpoint_url})" if checkpoint_url else "-")
        cells.append(f"[{label}]({record.source})")
        lines.append(markdown_row(cells))
    return "\n".join(lines) + "\n"


def latency_cell(latency_ms: float | None) -> str:
    """A latency as the README's tables show it: 12.3 -> '12.3ms'; '-' where none was reported."""
    return f"{latency_ms:.1f}ms" if latency_ms is not None else "-"


def markdown_row(cells: Sequence[str]) -> str:
    """One row of a Markdown table (header and alignment rows included)."""
    return "| " + " | ".join(cells) + " |"
