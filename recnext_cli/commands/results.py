"""`recnext results`: the README's results table from mmdet json logs or recnext test results."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def results(
    files: list[Path] = typer.Argument(
        ...,
        metavar="FILE",
        help="mmdet *.log.json files (the epoch with the best box mAP is reported, as upstream does) "
        "or recnext test-result .json files.",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of the Markdown table."),
) -> None:
    """Print the upstream README's results table (Markdown, ready to paste) for the given result files.

    Values are COCO mAP ×100 to one decimal; Latency and Ckpt come from the zoo, '-' for models it does not know.
    """
    from recnext_cli.results import markdown_table, read_result_files, table_rows

    records = read_result_files(files)
    if as_json:
        typer.echo(json.dumps(table_rows(records), indent=2))
    else:
        # Plain text, not a Rich table: the output is meant to be pasted into a README as it is.
        typer.echo(markdown_table(records), nl=False)
