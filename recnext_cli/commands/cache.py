"""`recnext cache ls / rm / clean`: what the cache holds with sizes, and removing entries or stale leftovers."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Look into the cache ($RECNEXT_HOME): checkpoints, partial downloads, locks, built mmcv wheels, logs.",
    no_args_is_help=True,
)


def human_size(size: int) -> str:
    """1536 -> '1.5 KiB'; below 1 KiB the bytes themselves."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@app.command("ls")
def ls(
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON (schema recnext.cache) instead of a table.",
    )] = False,
) -> None:
    """List what the cache holds, with sizes; entries marked stale are what `recnext cache clean` removes."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from recnext_cli import housekeeping, outputs

    listed = housekeeping.entries()
    root = housekeeping.cache_root()
    total = sum(entry.size for entry in listed)
    if as_json:
        rows = [
            {"name": entry.name, "kind": entry.kind, "size_bytes": entry.size, "note": entry.note, "stale": entry.stale}
            for entry in listed
        ]
        typer.echo(outputs.dumps(outputs.document("cache", root=str(root), total_bytes=total, entries=rows)))
        return
    console = Console(highlight=False)
    if not listed:
        console.print(f"the cache {escape(str(root))} is empty", soft_wrap=True)
        return
    stale = sum(entry.size for entry in listed if entry.stale)
    caption = f"cache: {escape(str(root))}\ntotal {human_size(total)}"
    if stale:
        caption += f"; `recnext cache clean` would free {human_size(stale)}"
    table = Table(box=box.SIMPLE_HEAD, caption=caption, caption_justify="left", pad_edge=False)
    table.add_column("entry", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("note", overflow="fold")
    for entry in listed:
        note = f"[yellow]stale: {escape(entry.stale)}[/]" if entry.stale else escape(entry.note)
        table.add_row(escape(entry.name), entry.kind, human_size(entry.size), note)
    console.print(table)


@app.command("rm")
def rm(
    targets: Annotated[Optional[list[str]], typer.Argument(
        metavar="NAME",
        help="Model names (their COCO checkpoint and its download leftovers) or entries as `recnext cache ls` "
        "prints them; a folder (wheels, logs, checkpoints) names everything in it.",
        show_default=False,
    )] = None,
    pretrain: Annotated[bool, typer.Option("--pretrain", help="Model names mean their ImageNet pretrain files.")] = False,
    everything: Annotated[bool, typer.Option("--all", help="Remove everything in the cache.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed.")] = False,
) -> None:
    """Remove cache entries: model files, wheels, logs, leftovers.

    Links are removed as links (what they point to is untouched), nothing outside the cache is ever removed, and an
    entry that a running download holds is left in place.
    """
    from recnext_cli import housekeeping
    from recnext_cli.errors import UsageError

    if bool(targets) == everything:
        raise UsageError("name what to remove (e.g. `recnext cache rm m3`) or pass --all, not both or neither")
    chosen = housekeeping.entries() if everything else housekeeping.named_entries(targets, pretrain)
    _report(housekeeping.remove(chosen, dry_run), dry_run, housekeeping.cache_root())


@app.command("clean")
def clean(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed, and why.")] = False,
) -> None:
    """Remove stale leftovers: dead partial downloads, unheld locks, links, wheels for another torch.

    Stale are: partial downloads whose writer was stopped or that can no longer be resumed, lock files no process
    holds, links planted in the cache, and mmcv wheels built for another mmcv, torch or Python than this
    environment's. Complete checkpoints, the manifest, logs and anything recnext did not write stay.
    """
    from recnext_cli import housekeeping

    _report(housekeeping.remove(housekeeping.stale_entries(), dry_run), dry_run, housekeeping.cache_root())


def _report(outcomes, dry_run: bool, root) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    if not outcomes:
        console.print(f"nothing to remove in {escape(str(root))}", soft_wrap=True)
        return
    freed = 0
    for outcome in outcomes:
        entry = outcome.entry
        why = f": {escape(entry.stale)}" if entry.stale else ""
        line = f"{escape(entry.name)} ({human_size(entry.size)}){why}"
        if outcome.removed:
            freed += entry.size
            console.print(f"removed {line}", soft_wrap=True)
        elif dry_run:
            freed += entry.size
            console.print(f"would remove {line}", soft_wrap=True)
        else:
            console.print(f"[yellow]kept[/] {line}: {escape(outcome.reason)}", soft_wrap=True)
    console.print(f"{'would free' if dry_run else 'freed'} {human_size(freed)} in {escape(str(root))}", soft_wrap=True)
