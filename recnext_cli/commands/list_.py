"""`recnext list`: the model zoo with its published COCO results and what the cache holds of each file."""

from __future__ import annotations

import typer

# One symbol per cache status keeps the README-shaped table within 80 columns; the caption spells them out.
STATUS_MARKS = {
    "verified": "[green]✓[/]",
    "unverified": "[yellow]?[/]",
    "missing": "[dim]–[/]",
    "failed": "[red]✗[/]",
}
FIRST_SEEN_MARK = "*"
LEGEND = "✓ pinned digest  ✓* first-seen digest  ? not checked  ✗ failed  – not cached"
LATENCY_NOTE = "† published: the upstream README's iPhone latency, not measured here"
METRIC_COLUMNS = (
    ("APᵇ", "bbox_mAP"),
    ("AP₅₀ᵇ", "bbox_mAP_50"),
    ("AP₇₅ᵇ", "bbox_mAP_75"),
    ("APᵐ", "segm_mAP"),
    ("AP₅₀ᵐ", "segm_mAP_50"),
    ("AP₇₅ᵐ", "segm_mAP_75"),
)


def list_models(
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON (schema recnext.list; AP as fractions 0-1) instead of a table.",
    ),
) -> None:
    """List RecNeXt models: published COCO box/mask AP and latency, and whether each file is cached and verified."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from recnext_cli import cache, fetch, outputs, zoo
    from recnext_cli.results import published_metrics

    def file_entry(checkpoint: zoo.Checkpoint | None) -> dict | None:
        if checkpoint is None:
            return None
        state = fetch.cached_state(checkpoint)
        return {
            "file_name": checkpoint.file_name,
            "url": fetch.download_url(checkpoint),
            "path": str(state.path),
            "status": state.status,
            "trust": state.trust,
            "detail": state.detail,
        }

    rows = [
        {
            "name": model.name,
            "title": model.title,
            "series": model.series,
            "release_tag": model.release_tag,
            "config": model.config,
            "metrics": published_metrics(model),
            "latency_ms": model.metrics.latency_ms if model.metrics else None,
            "checkpoint": file_entry(model.coco),
            "pretrain": file_entry(model.pretrain),
        }
        for model in zoo.MODELS.values()
    ]
    if as_json:
        typer.echo(outputs.dumps(outputs.document("list", models=rows)))
        return

    pinned = sum(checkpoint.pinned for checkpoint in zoo.CHECKPOINTS.values())
    trust = f"{pinned} of {len(zoo.CHECKPOINTS)} files pinned" if pinned else "no file is pinned: each is trusted on first use"
    caption = f"{LEGEND}\n{LATENCY_NOTE}\n{trust}\ncache: {escape(str(cache.checkpoints_dir()))}"
    table = Table(box=box.SIMPLE_HEAD, caption=caption, caption_justify="left", collapse_padding=True, pad_edge=False)
    table.add_column("Model", no_wrap=True)
    for title, _ in METRIC_COLUMNS:
        table.add_column(title, justify="center")
    table.add_column("Latency†", justify="center")
    table.add_column("Ckpt", justify="center")
    table.add_column("Pretrain", justify="center")
    for section in ([row for row in rows if row["metrics"]], [row for row in rows if not row["metrics"]]):
        for row in section:
            table.add_row(
                row["title"], *_metric_cells(row["metrics"], row["latency_ms"]),
                _file_cell(row["checkpoint"]), _file_cell(row["pretrain"]),
            )
        table.add_section()
    Console().print(table)


def _metric_cells(metrics: dict | None, latency_ms: float | None) -> list[str]:
    from recnext_cli.results import format_percent

    if metrics is None:
        return ["—"] * (len(METRIC_COLUMNS) + 1)
    return [format_percent(metrics[key]) for _, key in METRIC_COLUMNS] + [f"{latency_ms:.1f}ms"]


def _file_cell(entry: dict | None) -> str:
    if entry is None:
        return ""
    first_seen = entry["status"] == "verified" and entry["trust"] == "first seen"
    return STATUS_MARKS[entry["status"]] + (FIRST_SEEN_MARK if first_seen else "")
