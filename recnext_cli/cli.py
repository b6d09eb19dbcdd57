"""The `recnext` command: assembles one Typer command per module in recnext_cli/commands/."""

from __future__ import annotations

import sys

import typer

from recnext_cli.commands import (
    bench, cache, config, demo, doctor, download, export, infer, list_, pin, results, setup, test, train, verify,
)
from recnext_cli.commands._options import VariadicCommand
from recnext_cli.commands.version import print_version
from recnext_cli.errors import RecnextError

app = typer.Typer(
    name="recnext",
    help="Reproduce RecNeXt Mask R-CNN results on current PyTorch: zoo, downloads, setup, test, train, benchmarks.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=print_version, is_eager=True,
        help="Print recnext's version and the installed torch / mmcv / mmdet versions, then exit.",
    ),
) -> None:
    """recnext: RecNeXt detection checkpoints that download, verify, test and train on today's PyTorch."""


app.command("setup")(setup.setup)
app.command("list")(list_.list_models)
app.command("download")(download.download)
app.command("verify")(verify.verify)
app.command("pin")(pin.pin)
app.command("doctor")(doctor.doctor)
app.command("results")(results.results)
app.command("test", cls=VariadicCommand)(test.test)
app.command("train", cls=VariadicCommand)(train.train)
app.command("config", cls=VariadicCommand)(config.config)
app.command("infer")(infer.infer)
app.command("export")(export.export)
app.add_typer(bench.app, name="bench")
app.add_typer(cache.app, name="cache")
app.command("demo")(demo.demo)


def main() -> None:
    from recnext_cli import noise

    noise.silence()  # before any command imports torch or mmcv
    try:
        app()
    except RecnextError as exc:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
