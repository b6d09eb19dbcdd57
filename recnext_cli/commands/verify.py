"""`recnext verify`: re-hash cached checkpoints and re-check their structure; exit 1 when any fails."""

from __future__ import annotations

import typer


def verify(
    names: list[str] = typer.Argument(None, metavar="NAME", help="Models whose files to check (default: every cached file)."),
    pretrain: bool = typer.Option(False, "--pretrain", help="Check the named models' ImageNet pretraining checkpoints instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Re-hash cached checkpoints against the zoo's pin or, where none exists, the digest recorded when the file was
    first seen, and check their backbone keys and shapes.

    A cached file with no recorded digest yet (copied in by hand) is checked the same way and its digest recorded.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from recnext_cli import cache, fetch, zoo
    from recnext_cli.outputs import document, dumps

    if names:
        checkpoints = [zoo.get_checkpoint(name, pretrain, offers_pretrain=True) for name in names]
    else:
        checkpoints = [c for c in zoo.CHECKPOINTS.values() if fetch.cached_state(c).status != fetch.MISSING]

    console = Console(stderr=as_json)
    states = []
    for checkpoint in checkpoints:
        with console.status(f"verifying {checkpoint.file_name}"):
            states.append(fetch.verify_cached(checkpoint))
    failed = [state for state in states if state.status != fetch.VERIFIED]

    if as_json:
        typer.echo(dumps(document("verify", files=[
            {
                "model": state.checkpoint.model,
                "kind": state.checkpoint.kind,
                "file_name": state.checkpoint.file_name,
                "path": str(state.path),
                "status": state.status,
                "trust": state.trust,
                "detail": state.detail,
            }
            for state in states
        ])))
    elif not states:
        console.print(f"nothing cached in {escape(str(cache.checkpoints_dir()))}")
    else:
        table = Table("File", "Status", "Trust", "Detail")
        for state in states:
            mark = "[green]✓ verified[/]" if state.status == fetch.VERIFIED else f"[red]✗ {state.status}[/]"
            table.add_row(state.checkpoint.file_name, mark, state.trust, escape(state.detail))
        console.print(table)
        if any(state.trust == fetch.FIRST_SEEN for state in states):
            console.print("first seen: compared with the digest recorded at the first download (trust on first use); "
                          "only files in the zoo's pin table are checked against a digest fixed in advance")
    if failed:
        raise typer.Exit(1)
