"""Where recnext keeps files (the user cache directory, or $RECNEXT_HOME) and the manifest of trusted checkpoint digests."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from filelock import FileLock

from recnext_cli.errors import IntegrityError

MANIFEST_VERSION = 1


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


@dataclasses.dataclass(frozen=True)
class Record:
    """The digest and size of a checkpoint file as they were when it was first verified."""

    sha256: str
    size: int


def read_manifest() -> dict[str, Record]:
    """Every recorded file name and its record; an absent manifest is an empty one."""
    path = manifest_path()
    try:
        data = json.loads(path.read_text())
        return {name: Record(entry["sha256"], entry["size"]) for name, entry in data["files"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(
            f"the checkpoint manifest {path} is unreadable ({exc}); delete it and run `recnext verify` "
            "to record the digests of the cached files again"
        ) from exc


def recorded(file_name: str) -> Record | None:
    return read_manifest().get(file_name)


def remember(file_name: str, record: Record, replace: bool = False) -> Record:
    """Record `file_name`'s digest unless another one is already recorded (replace=True overrides it).

    Returns the record the manifest holds afterwards, so a caller racing another process learns which bytes won.
    """
    path = manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        records = read_manifest()
        current = records.get(file_name)
        if current is not None and (current == record or not replace):
            return current
        records[file_name] = record
        _write_atomically(path, {
            "version": MANIFEST_VERSION,
            "files": {name: dataclasses.asdict(entry) for name, entry in sorted(records.items())},
        })
    return record


def _write_atomically(path: Path, data: dict) -> None:
    # A unique temporary name per writer and os.replace: readers see the old or the new manifest, never half of one,
    # even on file systems where the lock above is silently a no-op.
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
