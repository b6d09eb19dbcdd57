"""`recnext results`: the README's results table from mmdet json logs or recnext test results."""

from __future__ import annotations

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
    as_json: bool = typer.Option(
        False, "--json", help="Print the rows as JSON (schema recnext.results; AP as fractions 0-1) instead of the table.",
    ),
) -> None:
    """Print the upstream README's results table (Markdown, ready to paste) for the given result files.

    Table values are COCO mAP ×100 to one decimal. Each row keeps to its own source: a training log's row shows the
    upstream README's (published, iPhone) latency and links the checkpoint its run wrote beside it, else the upstream
    one; a `recnext test` row shows no latency (none was measured) and links the checkpoint it evaluated.
    """
    from recnext_cli.outputs import dumps
    from recnext_cli.results import markdown_table, read_result_files, results_document

    records = read_result_files(files)
    if as_json:
        typer.echo(dumps(results_document(records)))
    else:
        # Plain text, not a Rich table: the output is meant to be pasted into a README as it is.
        typer.echo(markdown_table(records), nl=False)
        if any(record.epoch is not None for record in records):
            typer.echo("Latency: the upstream README's published iPhone figure, not measured here", err=True)
