"""`recnext doctor`: is this environment able to run RecNeXt detection, and what was repaired in-process."""

from __future__ import annotations

import dataclasses

import typer

STYLE = {"ok": "green", "fixed in-process": "cyan", "warning": "yellow", "broken": "bold red"}


def doctor(as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")) -> None:
    """Check Python, torch, torchvision, mmcv-full, mmdet, GPUs, the cache, and every known mmcv/torch incompatibility.

    Exits 0 when the stack can run recnext's jobs, 1 otherwise.
    """
    from rich.console import Console
    from rich.table import Table

    from recnext_cli.diagnose import diagnose, usable
    from recnext_cli.outputs import document, dumps

    checks = diagnose()
    healthy = usable(checks)
    if as_json:
        typer.echo(dumps(document("doctor", usable=healthy, checks=[dataclasses.asdict(c) for c in checks])))
    else:
        table = Table(title="recnext doctor")
        for column in ("check", "found", "status", "remedy"):
            table.add_column(column, overflow="fold")
        for c in checks:
            table.add_row(c.name, c.value, f"[{STYLE[c.status]}]{c.status}[/]", c.remedy)
        console = Console()
        console.print(table)
        console.print("[green]usable[/]" if healthy else "[bold red]not usable[/]: follow the remedies above")
    raise typer.Exit(0 if healthy else 1)
