"""Downloads in progress on disk: the .part file with its version sidecar, parking a stopped one for the next run,
and tidying what killed writers left."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from recnext_cli import cache
from recnext_cli.errors import IntegrityError
from recnext_cli.fetch import transport

ABANDONED_SECONDS = 600  # a private .part untouched this long belongs to a writer that was killed
PARKED_SECONDS = 7 * 24 * 3600  # a stopped download older than this starts over

# Each writer streams into <name>.<random>.part, a file only it has open, so two writers never interleave
# bytes even where file locks are silently no-ops (Lustre, GPFS); <name>.part only holds a stopped download for the
# next run. Beside each .part, <.part>.json names the version its bytes belong to (the URL, the ETag or Last-Modified
# the server sent, the full size) and the file's inode, which a rename keeps: resuming asks for the rest with If-Range,
# so a server with a new version sends all of it instead of a tail that would splice two versions.


def sidecar(part: Path) -> Path:
    return Path(f"{part}.json")


class PartFile:
    """A download in progress: its bytes on disk, their running SHA-256, and the version they belong to."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url
        self.size = 0
        self.version: tuple[str, str] | None = None  # ("ETag" or "Last-Modified", the value the server sent)
        self.total: int | None = None
        self._hash = hashlib.sha256()

    def __enter__(self) -> PartFile:
        self._fd = cache.open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        info = os.fstat(self._fd)
        version, total = self._read_sidecar(info)
        if version is None or (total is not None and info.st_size > total):
            self.restart()
        else:
            self.version, self.total = version, total
            # The digest of a resumed download must cover the bytes an earlier attempt left on disk.
            while block := os.pread(self._fd, transport.CHUNK_SIZE, self.size):
                self._hash.update(block)
                self.size += len(block)
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)

    def _read_sidecar(self, info: os.stat_result) -> tuple[tuple[str, str] | None, int | None]:
        path = sidecar(self.path)
        try:
            with os.fdopen(cache.open_regular(path, os.O_RDONLY), "rb") as source:
                meta = json.loads(source.read(64 * 1024))
            version, total = tuple(meta["version"]), meta["total"]
            valid = (
                meta["url"] == self.url and meta["inode"] == [info.st_dev, info.st_ino]
                and len(version) == 2 and version[0] in ("ETag", "Last-Modified") and isinstance(version[1], str)
                and (total is None or type(total) is int)
            )
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        return (version, total) if valid else (None, None)

    def begin(self, version: tuple[str, str] | None, total: int | None) -> None:
        """Start over with the version a full response names; without a version the bytes cannot be resumed later."""
        self.restart()
        self.version, self.total = version, total
        if version is None:
            return
        info = os.fstat(self._fd)
        meta = {"url": self.url, "version": list(version), "total": total, "inode": [info.st_dev, info.st_ino]}
        descriptor = cache.open_regular(sidecar(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(descriptor, "w") as out:
            json.dump(meta, out)

    def append(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            # A full disk takes part of a chunk, then fails: what was written stays hashed and counted, to resume from.
            written = os.write(self._fd, view)
            self._hash.update(view[:written])
            self.size += written
            view = view[written:]

    def restart(self) -> None:
        os.ftruncate(self._fd, 0)
        sidecar(self.path).unlink(missing_ok=True)
        self._hash = hashlib.sha256()
        self.size = 0
        self.version = self.total = None

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _refuse_odd(path: Path) -> None:
    """Raise IntegrityError when a cache entry this module would rename or open is a link or not a regular file."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if path.is_symlink():
        raise IntegrityError(cache.link_message(path))
    if not path.is_file() or info.st_nlink > 1:
        raise IntegrityError(f"{path} is not a plain file of its own; remove it from the cache and run again")


def tidy(path: Path, parked: Path) -> None:
    """Expire an old stopped download, adopt what writers killed outright left behind, drop orphaned sidecars.

    Only private files nobody has written to for ABANDONED_SECONDS count as abandoned: a live download appends every
    chunk. The largest becomes <name>.part when there is none; the rest are deleted. Renames are atomic, so racing
    runs cannot share one.
    """
    for entry in (parked, sidecar(parked)):
        _refuse_odd(entry)
    now = time.time()
    if _age(parked, now) > PARKED_SECONDS:
        remove(parked)
    abandoned = []
    for candidate in path.parent.glob(f"{path.name}.*.part"):
        _refuse_odd(candidate)
        _refuse_odd(sidecar(candidate))
        if _age(candidate, now) > ABANDONED_SECONDS:
            abandoned.append((candidate.lstat().st_size, candidate))
    for index, (_, candidate) in enumerate(sorted(abandoned, reverse=True)):
        if index == 0 and not os.path.lexists(parked) and os.path.lexists(sidecar(candidate)):
            try:
                os.replace(sidecar(candidate), sidecar(parked))
                os.replace(candidate, parked)
            except FileNotFoundError:
                remove(candidate)
        else:
            remove(candidate)
    for orphan in path.parent.glob(f"{path.name}*.part.json"):
        if not os.path.lexists(orphan.with_suffix("")) and _age(orphan, now) > ABANDONED_SECONDS:
            orphan.unlink(missing_ok=True)


def _age(path: Path, now: float) -> float:
    """Seconds since `path` was last written, or -1 when it does not exist."""
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return -1.0


def remove(part: Path) -> None:
    sidecar(part).unlink(missing_ok=True)
    part.unlink(missing_ok=True)


def park(private: Path, parked: Path) -> None:
    # Bytes without a sidecar have no version a server could confirm: a later run could not resume them.
    try:
        keep = private.lstat().st_size > 0 and sidecar(private).is_file()
    except FileNotFoundError:
        keep = False
    if keep:
        os.replace(sidecar(private), sidecar(parked))
        os.replace(private, parked)
    else:
        remove(private)
