"""Decide whether cached or downloaded bytes are trusted: the zoo's pins, digests recorded on first use, offline mode."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from recnext_cli import cache, zoo
from recnext_cli.errors import IntegrityError
from recnext_cli.fetch import checks, transport
from recnext_cli.zoo import Checkpoint

MISSING = "missing"
UNVERIFIED = "unverified"
VERIFIED = "verified"
FAILED = "failed"

PINNED = "pinned"
FIRST_SEEN = "first seen"


@dataclasses.dataclass(frozen=True)
class FileState:
    """What the cache holds for one checkpoint: MISSING, UNVERIFIED (present, never checked), VERIFIED or FAILED.

    trust says what the bytes were compared with: PINNED (the zoo's digest), FIRST_SEEN (the digest recorded on the
    first download, trust on first use), or "" when nothing was compared.
    """

    checkpoint: Checkpoint
    path: Path
    status: str
    detail: str = ""
    trust: str = ""


def offline() -> bool:
    return os.environ.get("RECNEXT_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_command(checkpoint: Checkpoint) -> str:
    """The command that fetches `checkpoint`, for messages that tell people what to run."""
    flag = " --pretrain" if checkpoint.kind == zoo.IMAGENET else ""
    return f"recnext download {checkpoint.model}{flag}"


def cached_state(checkpoint: Checkpoint) -> FileState:
    """What the cache holds for `checkpoint`, from the manifest and the file size alone (no hashing, no torch)."""
    path = cache.checkpoint_path(checkpoint.file_name)
    cache.checked_dir(create=False)
    if path.is_symlink():
        return FileState(checkpoint, path, FAILED, cache.link_message(path))
    if not path.is_file():
        return FileState(checkpoint, path, MISSING)
    record = cache.recorded(checkpoint.file_name)
    size = path.stat().st_size
    if checkpoint.pinned:
        if size != checkpoint.size or (record is not None and record.sha256 != checkpoint.sha256):
            return FileState(checkpoint, path, FAILED, "differs from the zoo's pin; run `recnext verify`", PINNED)
        if record is None:
            return FileState(checkpoint, path, UNVERIFIED, "present but never verified; run `recnext verify`", PINNED)
        return FileState(checkpoint, path, VERIFIED, "", PINNED)
    if record is None:
        return FileState(checkpoint, path, UNVERIFIED, "present but never verified; run `recnext verify`")
    if size != record.size:
        detail = f"{size} bytes, but {record.size} were verified; run `recnext verify`"
        return FileState(checkpoint, path, FAILED, detail, FIRST_SEEN)
    return FileState(checkpoint, path, VERIFIED, _first_seen(record), FIRST_SEEN)


def _first_seen(record: cache.Record) -> str:
    when = f"first seen {record.first_seen}" if record.first_seen else "first seen"
    return f"{when} from {record.source}" if record.source else when


def verify_cached(checkpoint: Checkpoint, recheck_structure: bool = True) -> FileState:
    """Re-hash `checkpoint`'s cached file and compare it with the pinned or recorded digest.

    A file with no record yet must also pass check_structure and is then recorded (trust on first use).
    recheck_structure=False skips reading a file whose digest equals its record: those bytes were checked on arrival.
    """
    path = cache.checkpoint_path(checkpoint.file_name)
    cache.checked_dir(create=False)
    if path.is_symlink():
        return FileState(checkpoint, path, FAILED, cache.link_message(path))
    if not path.is_file():
        return FileState(checkpoint, path, MISSING, f"not downloaded; run `{download_command(checkpoint)}`")
    hasher = hashlib.sha256()
    try:
        size = _hash_into(hasher, path)
    except OSError as exc:
        return FileState(checkpoint, path, FAILED, f"cannot read it: {exc.strerror}")
    digest = hasher.hexdigest()
    record = cache.recorded(checkpoint.file_name)
    trust = PINNED if checkpoint.pinned else FIRST_SEEN
    problem = _pin_problem(checkpoint, digest, size)
    if problem is None and not checkpoint.pinned and record is not None and record.sha256 != digest:
        problem = f"sha256 {digest[:16]}… differs from {record.sha256[:16]}… recorded when it was first verified"
    if problem is not None:
        detail = f"{problem}; run `{download_command(checkpoint)} --force` to fetch it again"
        return FileState(checkpoint, path, FAILED, detail, trust)
    if record is None or recheck_structure:
        try:
            checks.check_structure(path, checkpoint)
        except IntegrityError as exc:
            return FileState(checkpoint, path, FAILED, str(exc), trust)
    if record is None:
        record = cache.remember(checkpoint.file_name, cache.new_record(digest, size, ""))
        if record.sha256 != digest:
            return FileState(checkpoint, path, FAILED, "another process recorded a different digest for it just now")
        detail = "matches the zoo's pin" if checkpoint.pinned else "first use: digest recorded now"
        return FileState(checkpoint, path, VERIFIED, detail, trust)
    return FileState(checkpoint, path, VERIFIED, "" if checkpoint.pinned else _first_seen(record), trust)


def _pin_problem(checkpoint: Checkpoint, digest: str, size: int) -> str | None:
    if checkpoint.size is not None and size != checkpoint.size:
        return f"{size} bytes where the zoo pins {checkpoint.size}"
    if checkpoint.sha256 is not None and digest != checkpoint.sha256:
        return f"sha256 {digest[:16]}… where the zoo pins {checkpoint.sha256[:16]}…"
    return None


def accept(checkpoint: Checkpoint, part: Path, digest: str, size: int, accept_new_digest: bool) -> None:
    """Raise IntegrityError unless downloaded bytes match the pinned or recorded digest and read as `checkpoint`."""
    source = transport.download_url(checkpoint)
    problem = _pin_problem(checkpoint, digest, size)
    if problem is not None:
        raise IntegrityError(
            f"{source} sent {problem}; nothing was cached. If the release was re-published on purpose, "
            "the pin in recnext_cli/zoo.py needs updating"
        )
    record = cache.recorded(checkpoint.file_name)
    if not checkpoint.pinned and record is not None and record.sha256 != digest and not accept_new_digest:
        raise IntegrityError(
            f"{source} sent bytes with sha256 {digest[:16]}…, but {record.sha256[:16]}… was recorded when "
            f"{checkpoint.file_name} was first downloaded; the cached file (if any) was kept. If the release was "
            f"re-published on purpose, run `{download_command(checkpoint)} --force --accept-new-digest`"
        )
    checks.check_structure(part, checkpoint)
    replace = accept_new_digest or checkpoint.pinned
    if cache.remember(checkpoint.file_name, cache.new_record(digest, size, source), replace).sha256 != digest:
        raise IntegrityError(
            f"another process recorded a different digest for {checkpoint.file_name} while this one downloaded it; "
            f"run `recnext verify {checkpoint.model}` to see which bytes are cached"
        )


def _hash_into(hasher, path: Path) -> int:
    size = 0
    with os.fdopen(cache.open_regular(path, os.O_RDONLY), "rb") as source:
        for block in iter(lambda: source.read(transport.CHUNK_SIZE), b""):
            hasher.update(block)
            size += len(block)
    return size
