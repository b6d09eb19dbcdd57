"""What the cache holds, with sizes and what is stale, and removing entries: never through a link, never outside it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

from filelock import Timeout
from packaging.version import InvalidVersion, Version

from recnext_cli import cache, stack, zoo
from recnext_cli.errors import IntegrityError, UsageError
from recnext_cli.fetch import ABANDONED_SECONDS, PARKED_SECONDS

CHECKPOINT = "checkpoint"
PARTIAL = "partial download"
LOCK = "lock"
MANIFEST = "manifest"
WHEEL = "mmcv wheel"
LOGS = "logs"
LINK = "link"
OTHER = "other"

# A download in progress streams into <name>.<12 hex digits>.part; <name>.part is a stopped one kept for resuming.
_PRIVATE_PART = re.compile(r"(?P<file>.+)\.[0-9a-f]{12}\.part")
# cache._write_atomically's temporary manifests: .manifest.json.<random>.tmp
_MANIFEST_TEMPORARY = re.compile(r"\.manifest\.json\..+\.tmp")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One thing in the cache, as `recnext cache ls` lists it and `rm` / `clean` remove it.

    `paths` are removed together (a .part and its sidecar); `stale` says why `clean` removes the entry (None: kept);
    `lock` is the file lock to hold while removing it, so a running download is never pulled from under its writer.
    """

    name: str  # relative to the cache root, with '/' separators: "checkpoints/recnext_m3_coco.pth"
    kind: str
    paths: tuple[Path, ...]
    size: int
    note: str = ""
    stale: str | None = None
    lock: Path | None = None
    file_name: str | None = None  # the zoo file this entry holds or belongs to


@dataclasses.dataclass(frozen=True)
class Removal:
    entry: Entry
    removed: bool  # False: left in place (dry run, or in use by another process)
    reason: str = ""


def cache_root() -> Path:
    """The cache root with any link in RECNEXT_HOME itself resolved: below it, nothing is ever followed."""
    return Path(os.path.realpath(cache.cache_root()))


def entries() -> list[Entry]:
    """Everything in the cache, checkpoints first, then wheels, logs and anything else, each with its size in bytes."""
    root = cache_root()
    if not root.is_dir():
        return []
    cache.checked_dir(create=False)
    found: list[Entry] = []
    now = time.time()
    for path in _children(root):
        name = path.name
        if path.is_symlink():
            found.append(_link(root, path))
        elif name == "checkpoints" and path.is_dir():
            found += _checkpoint_entries(root, path, now)
        elif name == "wheels" and path.is_dir():
            found += _wheel_entries(root, path, now)
        elif name == "logs" and path.is_dir():
            count = sum(1 for _ in _children(path))
            found.append(Entry("logs", LOGS, (path,), tree_size(path), f"{count} log file{'s' * (count != 1)}"))
        else:
            found.append(Entry(name, OTHER, (path,), tree_size(path), "not recnext's; left alone by clean"))
    return found


def stale_entries() -> list[Entry]:
    return [entry for entry in entries() if entry.stale]


def named_entries(targets: Sequence[str], pretrain: bool = False) -> list[Entry]:
    """The entries `recnext cache rm` was given: names as `cache ls` prints them (a folder names all it holds), or
    model names, meaning that model's COCO checkpoint (ImageNet with `pretrain`) and its download leftovers.

    Only names found by listing the cache match, so no target can reach outside it.
    """
    listed = entries()
    chosen: dict[str, Entry] = {}
    for target in targets:
        key = target.strip().strip("/")
        matches = [entry for entry in listed if entry.name == key or entry.name.startswith(f"{key}/")]
        if not matches and key and "/" not in key and "." not in key:
            checkpoint = zoo.get_checkpoint(key, pretrain, offers_pretrain=True)
            matches = [entry for entry in listed if entry.file_name == checkpoint.file_name]
            if not matches:
                raise UsageError(
                    f"nothing of {checkpoint.file_name} is in the cache {cache_root()}; `recnext cache ls` lists "
                    "what is"
                )
        if not matches:
            raise UsageError(
                f"nothing named {target!r} in the cache {cache_root()}; pass a model name or an entry as "
                "`recnext cache ls` prints it"
            )
        chosen.update((entry.name, entry) for entry in matches)
    return list(chosen.values())


def remove(chosen: Sequence[Entry], dry_run: bool = False) -> list[Removal]:
    """Remove each entry (links themselves, never what they point to); with `dry_run`, only say what would go.

    An entry whose file lock another process holds (a download running) is left in place.
    """
    root = cache_root()
    outcomes = []
    # Lock files last: the entries they guard are removed while holding them.
    for entry in sorted(chosen, key=lambda entry: entry.kind == LOCK):
        for path in entry.paths:
            _require_inside(root, path)
        if dry_run:
            outcomes.append(Removal(entry, False, "dry run"))
            continue
        try:
            with _unless_in_use(entry.lock):
                for path in entry.paths:
                    _remove_path(path)
        except Timeout:
            outcomes.append(Removal(entry, False, "in use by another process (a download is running); run again later"))
            continue
        outcomes.append(Removal(entry, True))
    return outcomes


def tree_size(path: Path) -> int:
    """Bytes in `path`, a file or a folder counted without following any link (a link counts as itself)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for folder, _, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _children(folder: Path) -> Iterator[Path]:
    return iter(sorted(folder.iterdir()))


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _link(root: Path, path: Path) -> Entry:
    return Entry(_relative(root, path), LINK, (path,), tree_size(path), "symbolic link; recnext never follows it",
                 stale="a link in the cache, which recnext refuses to use (only the link is removed)",
                 file_name=path.name if path.name in zoo.CHECKPOINTS else None)


def _checkpoint_entries(root: Path, folder: Path, now: float) -> list[Entry]:
    children = {path.name: path for path in _children(folder)}
    found = []
    for name, path in children.items():
        relative = _relative(root, path)
        if path.is_symlink():
            found.append(_link(root, path))
        elif name in zoo.CHECKPOINTS:
            checkpoint = zoo.CHECKPOINTS[name]
            what = "COCO detector" if checkpoint.kind == zoo.COCO else "ImageNet pretrain"
            found.append(Entry(relative, CHECKPOINT, (path,), tree_size(path), f"{checkpoint.title} {what}",
                               lock=Path(f"{path}.lock"), file_name=name))
        elif name == cache.manifest_path().name:
            note = "digests recorded when files were first seen"
            found.append(Entry(relative, MANIFEST, (path,), tree_size(path), note, lock=Path(f"{path}.lock")))
        elif name.endswith(".lock"):
            owner = name.removesuffix(".lock")
            held = _held(path)
            found.append(Entry(relative, LOCK, (path,), tree_size(path), "held by a running recnext" if held else "",
                               stale=None if held else "a lock file no process holds", lock=path,
                               file_name=owner if owner in zoo.CHECKPOINTS else None))
        elif name.endswith(".part"):
            found.append(_partial(root, path, children, now))
        elif name.endswith(".part.json"):
            if name.removesuffix(".json") not in children:
                found.append(Entry(relative, PARTIAL, (path,), tree_size(path), "record of a partial download",
                                   stale="its partial download is gone" if _age(path, now) > ABANDONED_SECONDS else None,
                                   file_name=_part_owner(name.removesuffix(".json"))))
        elif _MANIFEST_TEMPORARY.fullmatch(name):
            stale = "left by a writer that was stopped" if _age(path, now) > ABANDONED_SECONDS else None
            found.append(Entry(relative, PARTIAL, (path,), tree_size(path), "manifest being written", stale))
        else:
            found.append(Entry(relative, OTHER, (path,), tree_size(path), "not recnext's; left alone by clean"))
    return found


def _part_owner(part_name: str) -> str | None:
    """The zoo file a .part belongs to: <file>.part (stopped, resumable) or <file>.<hex>.part (being written)."""
    private = _PRIVATE_PART.fullmatch(part_name)
    owner = private.group("file") if private else part_name.removesuffix(".part")
    return owner if owner in zoo.CHECKPOINTS else None


def _partial(root: Path, path: Path, children: dict[str, Path], now: float) -> Entry:
    sidecar = children.get(f"{path.name}.json")
    paths = (path, sidecar) if sidecar is not None and not sidecar.is_symlink() else (path,)
    size = sum(tree_size(p) for p in paths)
    owner = _part_owner(path.name)
    lock = path.parent / f"{owner}.lock" if owner else None
    age = _age(path, now)
    if _PRIVATE_PART.fullmatch(path.name):
        if age > ABANDONED_SECONDS:
            stale = f"untouched for {age / 60:.0f} minutes: its download was stopped"
            return Entry(_relative(root, path), PARTIAL, paths, size, "", stale, lock, owner)
        return Entry(_relative(root, path), PARTIAL, paths, size, "download in progress", None, lock, owner)
    if owner is None:
        stale = "belongs to no file of the zoo"
    elif age > PARKED_SECONDS:
        stale = f"older than {PARKED_SECONDS // 86400} days: a download would start over anyway"
    elif sidecar is None:
        stale = "no record of which version of the file its bytes are, so a download cannot resume it"
    else:
        return Entry(_relative(root, path), PARTIAL, paths, size, "stopped download; `recnext download` resumes it",
                     None, lock, owner)
    return Entry(_relative(root, path), PARTIAL, paths, size, "", stale, lock, owner)


def _wheel_entries(root: Path, folder: Path, now: float) -> list[Entry]:
    found = []
    for path in _children(folder):
        relative = _relative(root, path)
        if path.is_symlink():
            found.append(_link(root, path))
        elif path.is_dir() and path.name.endswith(".part"):
            stale = "left by a build that was stopped" if _age(path, now) > ABANDONED_SECONDS else None
            found.append(Entry(relative, WHEEL, (path,), tree_size(path), "build being stored", stale))
        elif path.is_dir():
            note, stale = _wheel_state(path)
            found.append(Entry(relative, WHEEL, (path,), tree_size(path), note, stale))
        else:
            found.append(Entry(relative, OTHER, (path,), tree_size(path), "not recnext's; left alone by clean"))
    return found


def _wheel_state(folder: Path) -> tuple[str, str | None]:
    """What a built mmcv wheel is for, and why it is stale: another mmcv, or compiled for another torch or Python."""
    wheels = [path for path in folder.glob("mmcv*.whl") if not path.is_symlink()]
    build = folder / "build.json"
    try:
        key = stack.BuildKey(**json.loads(build.read_text())) if not build.is_symlink() else None
    except (OSError, ValueError, TypeError):
        key = None
    if key is None or not wheels:
        return "", "an incomplete build (no wheel or no build.json)"
    if not key.compiled:
        note = f"mmcv {key.mmcv} Python package (any torch)"
        return note, None if key.mmcv == stack.MMCV_VERSION else f"mmcv {key.mmcv}; recnext installs {stack.MMCV_VERSION}"
    note = f"mmcv-full {key.mmcv} compiled ({key.flavour}) for torch {key.torch}, {key.python_tag}"
    torch = _installed_torch()
    if key.mmcv != stack.MMCV_VERSION:
        return note, f"mmcv {key.mmcv}; recnext installs {stack.MMCV_VERSION}"
    if _public(key.torch) != _public(torch):
        return note, f"built for torch {key.torch}, but this environment has torch {torch}"
    if key.python_tag != stack.python_tag():
        return note, f"built for {key.python_tag}, but this Python is {stack.python_tag()}"
    return note, None


def _installed_torch() -> str:
    """The torch version here from its metadata (no import), else the pinned one `recnext setup` would install."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return stack.TORCH_VERSION


def _public(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the metadata of a CUDA build of torch may or may not carry the local part."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def _held(lock_path: Path) -> bool:
    try:
        with cache.lock(lock_path, 0):
            return False
    except Timeout:
        return True


@contextlib.contextmanager
def _unless_in_use(lock_path: Path | None) -> Iterator[None]:
    """Hold an existing lock file without waiting (filelock.Timeout when another process holds it); create none.

    A lock file that is itself the entry being removed is unlinked while held: filelock notices a lock file unlinked
    under it and takes a fresh one, so no waiter ends up holding a lock nobody else can see.
    """
    if lock_path is None or not os.path.lexists(lock_path):
        yield
        return
    with cache.lock(lock_path, 0):
        yield


def _require_inside(root: Path, path: Path) -> None:
    """Refuse a path that is not strictly inside the cache root or that reaches it through a link."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise IntegrityError(f"{path} is outside the cache {root}; nothing was removed") from None
    if not relative.parts or ".." in relative.parts:
        raise IntegrityError(f"{path} is not an entry of the cache {root}; nothing was removed")
    folder = root
    for part in relative.parts[:-1]:
        folder = folder / part
        if folder.is_symlink() or not folder.is_dir():
            raise IntegrityError(f"{folder} is not a plain folder of the cache; nothing below it was removed")


def _remove_path(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        # rmtree removes links found inside as links; on Linux it works through directory descriptors, so a folder
        # swapped for a link while it runs is not followed either.
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
