"""`recnext --version`: recnext's version and the installed torch / mmcv / mmdet stack, read without importing it."""

from __future__ import annotations

import platform
from importlib import metadata

import typer

from recnext_cli import __version__

# Each package of the stack and the distributions that install it: mmcv 1.x ships as `mmcv` (recnext's Python-only
# build, mmcv-lite) or as `mmcv-full` (compiled ops), both importing as `mmcv`.
STACK = (
    ("torch", ("torch",)),
    ("torchvision", ("torchvision",)),
    ("mmcv", ("mmcv-full", "mmcv")),
    ("mmdet", ("mmdet",)),
)


def installed_version(distributions: tuple[str, ...]) -> str | None:
    """The version of the first of `distributions` installed here, from its metadata alone (no import: fast)."""
    for distribution in distributions:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def print_version(value: bool) -> None:
    """Typer callback of the eager --version option."""
    if not value:
        return
    typer.echo(f"recnext {__version__} (Python {platform.python_version()})")
    width = max(len(package) for package, _ in STACK)
    for package, distributions in STACK:
        version = installed_version(distributions)
        typer.echo(f"{package:<{width}}  {version or 'not installed (`recnext setup` installs it)'}")
    raise typer.Exit()
