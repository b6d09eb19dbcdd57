"""`recnext download`: fetch checkpoints into the cache with a progress bar, resuming and verifying them."""

from __future__ import annotations

import typer


def download(
    names: list[str] = typer.Argument(None, metavar="NAME", help="Models to fetch, e.g. m3 a4 (see `recnext list`)."),
    pretrain: bool = typer.Option(
        False, "--pretrain", help="Fetch the ImageNet pretraining checkpoint (what training starts from) instead of the COCO one."
    ),
    all_models: bool = typer.Option(
        False, "--all", help="Fetch every model's checkpoint: all COCO ones, or with --pretrain all ImageNet ones."
    ),
    force: bool = typer.Option(False, "--force", help="Download again even when the cached copy is good."),
    accept_new_digest: bool = typer.Option(
        False, "--accept-new-digest", help="Accept bytes whose SHA-256 differs from the one recorded on first download."
    ),
    timeout: str = typer.Option(
        None, "--timeout", metavar="SECONDS",
        help="Give up on a file after this long, waiting for another download of it included "
        "(default: $RECNEXT_DOWNLOAD_TIMEOUT, else 3600).",
    ),
) -> None:
    """Download checkpoints into the cache, resuming partial downloads, and verify them before they count as cached."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from recnext_cli import fetch, zoo
    from recnext_cli.errors import UsageError

    if bool(names) == all_models:
        raise UsageError("name the models to download (e.g. `recnext download m3`) or pass --all, not both or neither")
    seconds = fetch.download_timeout(timeout)
    if all_models:
        checkpoints = [model.pretrain if pretrain else model.coco for model in zoo.MODELS.values() if pretrain or model.coco]
    else:
        checkpoints = [zoo.get_checkpoint(name, pretrain, offers_pretrain=True) for name in names]

    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        for checkpoint in checkpoints:
            bar = _Bar(progress, checkpoint.file_name)

            def waiting(name: str = checkpoint.file_name) -> None:
                progress.console.print(f"waiting for another download of {escape(name)} (up to {seconds:g} s)")

            path = fetch.ensure_file(
                checkpoint, bar, force=force, accept_new_digest=accept_new_digest, timeout=seconds, on_wait=waiting
            )
            trust = "pinned" if checkpoint.pinned else "first seen, trusted on first use"
            if bar.reported:
                progress.console.print(f"[green]✓[/] {checkpoint.file_name} downloaded and verified ({trust}): {escape(str(path))}")
            else:
                progress.remove_task(bar.task)
                progress.console.print(f"[green]✓[/] {checkpoint.file_name} already cached and verified ({trust}): {escape(str(path))}")


class _Bar:
    """Feeds one file's byte counts into a Rich task; resets it on the first report and after a restart from zero,
    so resumed bytes do not count as speed."""

    def __init__(self, progress, name: str) -> None:
        self.progress = progress
        self.name = name
        self.task = progress.add_task(name, total=None)
        self.last: int | None = None

    @property
    def reported(self) -> bool:
        return self.last is not None

    def __call__(self, done: int, total: int | None) -> None:
        if self.last is None or done < self.last:
            self.progress.reset(self.task, total=total, completed=done)
        else:
            self.progress.update(self.task, total=total, completed=done)
        if done == total:
            # Hashing is done; reading the file to check its structure comes next.
            self.progress.update(self.task, description=f"{self.name} (verifying)")
        self.last = done
