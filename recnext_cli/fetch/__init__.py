"""Release checkpoints into the cache: fetched over https, checked against pins or first-seen digests and for
structure without torch, and renamed into place; safe with many processes downloading at once."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from filelock import Timeout

from recnext_cli import cache
from recnext_cli.errors import DownloadError, IntegrityError
from recnext_cli.fetch import parts, transport, trust
from recnext_cli.fetch.checks import LAYOUTS, check_structure, read_checkpoint
from recnext_cli.fetch.parts import ABANDONED_SECONDS, PARKED_SECONDS
from recnext_cli.fetch.transport import Progress, base_url, check_source, download_timeout, download_url
from recnext_cli.fetch.trust import (
    FAILED,
    FIRST_SEEN,
    MISSING,
    PINNED,
    UNVERIFIED,
    VERIFIED,
    FileState,
    cached_state,
    download_command,
    offline,
    verify_cached,
)
from recnext_cli.zoo import Checkpoint

# What the commands and tests use; the tunables (RETRIES, CHUNK_SIZE, ...) stay in their modules, where patching works.
__all__ = [
    "ABANDONED_SECONDS", "FAILED", "FIRST_SEEN", "LAYOUTS", "MISSING", "PARKED_SECONDS", "PINNED", "UNVERIFIED",
    "VERIFIED", "FileState", "Progress", "base_url", "cached_state", "check_source", "check_structure",
    "download_command", "download_timeout", "download_url", "ensure_file", "offline", "read_checkpoint",
    "verify_cached",
]


def ensure_file(
    checkpoint: Checkpoint,
    progress: Progress | None = None,
    *,
    force: bool = False,
    accept_new_digest: bool = False,
    timeout: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Path:
    """The verified local path of `checkpoint`, downloading it first when it is missing or fails its digest check.

    force fetches the file again even when the cached copy is good; bytes whose digest disagrees with the recorded
    one are refused (the cached file stays) unless accept_new_digest is set. Safe to call from many processes at once:
    one downloads, the others call on_wait, wait on a lock and return the finished file. The whole call, lock wait
    included, gives up after `timeout` seconds (default: download_timeout()).
    """
    deadline = transport.Deadline.after(download_timeout() if timeout is None else timeout)
    path = cache.checkpoint_path(checkpoint.file_name)
    try:
        return _ensure(checkpoint, path, progress, force, accept_new_digest, deadline, on_wait)
    except Timeout as exc:
        raise DownloadError(
            f"another process has held {path}.lock for {deadline.seconds:g} s while downloading {checkpoint.file_name}; "
            "gave up waiting. Run again once it is done, raise the limit (--timeout or RECNEXT_DOWNLOAD_TIMEOUT), "
            "or delete the lock file if no recnext is running"
        ) from exc
    except OSError as exc:
        raise DownloadError(
            f"cannot use {exc.filename or path.parent}: {exc.strerror or exc}; free space or make {path.parent} "
            "writable (or set RECNEXT_HOME elsewhere) and run again; bytes already received are kept"
        ) from exc


def _ensure(checkpoint: Checkpoint, path: Path, progress: Progress | None, force: bool, accept_new_digest: bool,
            deadline: transport.Deadline, on_wait: Callable[[], None] | None) -> Path:
    if force:
        reason = f"fetching {checkpoint.file_name} again was requested"
    else:
        state = verify_cached(checkpoint, recheck_structure=False)
        if state.status == VERIFIED:
            return path
        reason = f"{checkpoint.file_name} is not in the cache" if state.status == MISSING else (
            f"the cached {checkpoint.file_name} failed its check ({state.detail})"
        )
    url = download_url(checkpoint)
    if offline():
        raise DownloadError(
            f"{reason} and RECNEXT_OFFLINE is set, so nothing is downloaded; run `{download_command(checkpoint)}` "
            f"where the network is reachable (with the same RECNEXT_HOME), or copy {url} to {path}"
        )
    check_source(url)
    cache.checked_dir(create=True)
    cache.read_manifest()  # a damaged manifest stops the run before any byte is fetched
    if path.is_symlink():
        raise IntegrityError(cache.link_message(path))
    with cache.lock(Path(f"{path}.lock"), deadline.remaining(), on_wait):
        # Another process may have finished the download while this one waited for the lock.
        if not force and verify_cached(checkpoint, recheck_structure=False).status == VERIFIED:
            return path
        _download(checkpoint, path, progress, accept_new_digest, deadline)
    return path


def _download(checkpoint: Checkpoint, path: Path, progress: Progress | None, accept_new_digest: bool,
              deadline: transport.Deadline) -> None:
    parked = Path(f"{path}.part")
    parts.tidy(path, parked)
    private = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.part")
    for source, target in ((parked, private), (parts.sidecar(parked), parts.sidecar(private))):
        try:
            os.replace(source, target)
        except FileNotFoundError:
            pass
    url = download_url(checkpoint)
    try:
        with parts.PartFile(private, url) as out:
            digest, size = transport.stream(url, out, progress, deadline, checkpoint.size)
    except BaseException:
        parts.park(private, parked)
        raise
    try:
        trust.accept(checkpoint, private, digest, size, accept_new_digest)
    except IntegrityError:
        parts.remove(private)
        raise
    except BaseException:
        # Interrupted while checking: keep the bytes for the next run.
        parts.park(private, parked)
        raise
    parts.sidecar(private).unlink(missing_ok=True)
    os.replace(private, path)
