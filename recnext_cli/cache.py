"""Where recnext keeps files ($RECNEXT_HOME or the user cache directory), how it touches them safely, and the manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from recnext_cli.errors import IntegrityError, UsageError

MANIFEST_VERSION = 1
MANIFEST_MAX_BYTES = 1 << 20  # a manifest lists a dozen files; anything larger is not one
MANIFEST_LOCK_SECONDS = 60.0  # writers hold it for milliseconds: a minute means a stuck process
_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_root() -> Path:
    override = os.environ.get("RECNEXT_HOME")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("recnext", appauthor=False))


def checkpoints_dir() -> Path:
    return cache_root() / "checkpoints"


def checkpoint_path(file_name: str) -> Path:
    return checkpoints_dir() / file_name


def manifest_path() -> Path:
    return checkpoints_dir() / "manifest.json"


def checked_dir(create: bool) -> Path:
    """The checkpoint directory after refusing one that another user could write to; created first when asked.

    Without create a missing directory is returned as it is: there is nothing in it to distrust.
    """
    directory = checkpoints_dir()
    if create:
        _make_dirs(directory)
    elif not os.path.lexists(directory):
        return directory
    _refuse_shared(directory)
    return directory


def _make_dirs(directory: Path) -> None:
    missing = []
    for path in (directory, *directory.parents):
        if path.is_dir():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            # 0o755 whatever the umask: a group-writable directory of our own making would fail _refuse_shared.
            path.mkdir(mode=0o755)
        except FileExistsError:
            if not path.is_dir():
                raise UsageError(_not_a_directory(path)) from None
        except NotADirectoryError:
            raise UsageError(_not_a_directory(next(p for p in path.parents if p.exists()))) from None
        except OSError as exc:
            raise UsageError(f"cannot create the cache directory {path}: {exc.strerror}; {_move_hint()}") from exc


def _not_a_directory(path: Path) -> str:
    return f"the cache location {path} is a file, not a directory; {_move_hint()}"


def _move_hint() -> str:
    return "set RECNEXT_HOME to a directory of yours (it is created when missing)"


def _refuse_shared(directory: Path) -> None:
    """Raise UsageError where another user could plant or swap files in `directory` (POSIX permissions)."""
    uid = os.getuid()
    try:
        resolved = directory.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"cannot open the cache directory {directory} ({exc}); {_move_hint()}") from exc
    if not resolved.is_dir():
        raise UsageError(_not_a_directory(resolved))
    for path in (resolved, *resolved.parents):
        info = path.stat()
        own = path == resolved or path == resolved.parent
        if info.st_uid != uid and (own or info.st_uid != 0):
            raise UsageError(
                f"the cache directory {path} belongs to another user (uid {info.st_uid}), who could replace the "
                f"checkpoints in it; {_move_hint()}"
            )
        # Ancestors like /tmp may be world-writable with the sticky bit (nobody can rename others' entries); the
        # cache's own folders may not be writable by others at all, or others could plant files in them.
        if info.st_mode & 0o022 and (own or not info.st_mode & stat.S_ISVTX):
            raise UsageError(
                f"{path} is writable by other users, who could replace the checkpoints in the cache; run "
                f"`chmod go-w {path}` or {_move_hint()}"
            )


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open for a cache file: never follows a symbolic link at `path`, refuses anything but a regular file."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(link_message(path)) from exc
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise IntegrityError(f"{path} is not a regular file; remove it from the cache and run again")
    return descriptor


def link_message(path: Path) -> str:
    return (
        f"{path} is a symbolic link; recnext never follows links in its cache: delete the link (what it points to "
        "is not touched) and run again"
    )


@contextlib.contextmanager
def lock(path: Path, timeout: float, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the file lock `path`: at once when it is free, else after calling on_wait, waiting up to `timeout` seconds.

    Raises filelock.Timeout when the wait runs out, IntegrityError when `path` is a symbolic link (filelock >= 3.20.3
    opens lock files with O_NOFOLLOW).
    """
    file_lock = FileLock(str(path))
    try:
        try:
            file_lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            file_lock.acquire(timeout=max(timeout, 0.0))
    except Timeout:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(link_message(path)) from exc
        raise
    try:
        yield
    finally:
        file_lock.release()


@dataclasses.dataclass(frozen=True)
class Record:
    """The digest and size of a checkpoint file when it was first verified, with when and where it came from."""

    sha256: str
    size: int
    first_seen: str = ""  # local time of recording, "" in manifests written before recnext kept it
    source: str = ""  # the URL the bytes came from, or "" for a file that was found in the cache

    def same_bytes(self, other: Record) -> bool:
        return (self.sha256, self.size) == (other.sha256, other.size)


def new_record(sha256: str, size: int, source: str) -> Record:
    return Record(sha256, size, time.strftime("%Y-%m-%d %H:%M %Z"), source)


def read_manifest() -> dict[str, Record]:
    """Every recorded file name and its record; an absent manifest is an empty one."""
    path = manifest_path()
    checked_dir(create=False)
    try:
        descriptor = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise IntegrityError(f"cannot read the checkpoint manifest {path}: {exc.strerror}") from exc
    with os.fdopen(descriptor, "rb") as source:
        raw = source.read(MANIFEST_MAX_BYTES + 1)
    try:
        if len(raw) > MANIFEST_MAX_BYTES:
            raise ValueError(f"over {MANIFEST_MAX_BYTES} bytes")
        return _parse_manifest(json.loads(raw))
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise IntegrityError(
            f"the checkpoint manifest {path} is damaged ({exc}); delete it and run `recnext verify` to record the "
            "digests of the cached files again (they are then trusted on first use)"
        ) from exc


def _parse_manifest(data: object) -> dict[str, Record]:
    if not isinstance(data, dict):
        raise ValueError(f"its top level is {_json_type(data)}, not an object")
    version = data.get("version", MANIFEST_VERSION)
    if type(version) is not int or version > MANIFEST_VERSION:
        raise ValueError(f"version {version!r} is not one this recnext writes ({MANIFEST_VERSION})")
    files = data.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"'files' is {_json_type(files)}, not an object")
    records = {}
    for name, entry in files.items():
        if not isinstance(entry, dict):
            raise ValueError(f"the entry of {name!r} is {_json_type(entry)}, not an object")
        sha256, size = entry.get("sha256"), entry.get("size")
        first_seen, source = entry.get("first_seen", ""), entry.get("source", "")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"the sha256 of {name!r} is {sha256!r}, not 64 lowercase hex digits")
        if type(size) is not int or size < 0:
            raise ValueError(f"the size of {name!r} is {size!r}, not a byte count")
        if not isinstance(first_seen, str) or not isinstance(source, str):
            raise ValueError(f"the first_seen/source of {name!r} are not strings")
        records[name] = Record(sha256, size, first_seen, source)
    return records


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "missing" if value is None else names.get(type(value), type(value).__name__)


def recorded(file_name: str) -> Record | None:
    return read_manifest().get(file_name)


def remember(file_name: str, record: Record, replace: bool = False) -> Record:
    """Record `file_name`'s digest unless another one is already recorded (replace=True overrides it).

    Returns the record the manifest holds afterwards, so a caller racing another process learns which bytes won.
    """
    path = manifest_path()
    checked_dir(create=True)
    try:
        with lock(Path(f"{path}.lock"), MANIFEST_LOCK_SECONDS):
            records = read_manifest()
            current = records.get(file_name)
            if current is not None and (current.same_bytes(record) or not replace):
                return current
            records[file_name] = record
            _write_atomically(path, {
                "version": MANIFEST_VERSION,
                "files": {name: dataclasses.asdict(entry) for name, entry in sorted(records.items())},
            })
    except Timeout as exc:
        raise IntegrityError(
            f"the manifest lock {path}.lock has been held for {MANIFEST_LOCK_SECONDS:.0f} s; if no other recnext "
            "is running, delete it and run again"
        ) from exc
    except OSError as exc:
        raise IntegrityError(
            f"cannot update the checkpoint manifest {path}: {exc.strerror}; the manifest is unchanged, free space or "
            "fix the permissions and run again"
        ) from exc
    return record


def _write_atomically(path: Path, data: dict) -> None:
    # A unique temporary name per writer and os.replace: readers see the old or the new manifest, never half of one,
    # even on file systems where the lock above is silently a no-op. os.replace never follows a link at `path`.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as out:
            json.dump(data, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
