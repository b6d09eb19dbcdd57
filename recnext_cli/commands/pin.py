"""`recnext pin`: print the zoo's pin lines (SHA-256 and size) for cached files, to fix their digests in advance."""

from __future__ import annotations

import typer


def pin(
    names: list[str] = typer.Argument(None, metavar="NAME", help="Models whose files to pin (default: every cached file)."),
    pretrain: bool = typer.Option(False, "--pretrain", help="Pin the named models' ImageNet pretraining checkpoints instead."),
) -> None:
    """Print a `PINS` line of recnext_cli/zoo.py for each cached file, after re-hashing and re-checking it.

    A pin is only as trustworthy as the bytes it is taken from: run this where the files were downloaded over a
    network you trust (their source is listed on stderr), compare with a second download elsewhere, then paste the
    lines into PINS. Pinned files are refused on any other bytes, also on their first download. Exit 1 when a named
    file is missing or fails its check.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from recnext_cli import cache, fetch, zoo

    if names:
        checkpoints = [zoo.get_checkpoint(name, pretrain, offers_pretrain=True) for name in names]
    else:
        checkpoints = [c for c in zoo.CHECKPOINTS.values() if fetch.cached_state(c).status != fetch.MISSING]
    notes = Console(stderr=True)
    if not checkpoints:
        notes.print(f"nothing cached in {escape(str(cache.checkpoints_dir()))}; download the files to pin first")
        return

    lines, sources, failed = [], Table("File", "Checked against", "Source"), False
    for checkpoint in checkpoints:
        with notes.status(f"verifying {checkpoint.file_name}"):
            state = fetch.verify_cached(checkpoint)
        if state.status != fetch.VERIFIED:
            failed = True
            sources.add_row(checkpoint.file_name, f"[red]✗ {state.status}[/]", escape(state.detail))
            continue
        record = cache.recorded(checkpoint.file_name)
        lines.append(f'    "{checkpoint.file_name}": Pin("{record.sha256}", {record.size}),')
        trust = "its pin" if checkpoint.pinned else f"first seen {record.first_seen}".strip()
        sources.add_row(checkpoint.file_name, trust, escape(record.source or "found in the cache"))
    notes.print(sources)
    for line in lines:
        typer.echo(line)
    if failed:
        raise typer.Exit(1)
