"""Release checkpoints into the cache: https downloads resumed only from the same file version, bounded in time and
size, hashed while streaming, checked for structure without torch, and renamed into place."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.cookiejar
import json
import os
import pickle
import socket
import threading
import time
import urllib.parse
import uuid
import zipfile
from pathlib import Path
from typing import Callable

import requests
from filelock import Timeout

from recnext_cli import cache, zoo
from recnext_cli.errors import DownloadError, IntegrityError, UsageError
from recnext_cli.zoo import Checkpoint

CHUNK_SIZE = 1 << 20
TIMEOUT = (10, 60)  # seconds to connect, and to wait for the next bytes of a body
RETRIES = 5  # attempts in a row that kept no more bytes than the best attempt before them
BACKOFF_SECONDS = 1.0  # doubled after every further failed attempt
DEFAULT_DEADLINE_SECONDS = 3600.0  # for one file, lock wait included; RECNEXT_DOWNLOAD_TIMEOUT or --timeout change it
ABANDONED_SECONDS = 600  # a private .part untouched this long belongs to a writer that was killed
PARKED_SECONDS = 7 * 24 * 3600  # a stopped download older than this starts over
MAX_DOWNLOAD_BYTES = 1 << 30  # the most an unpinned file may be; release checkpoints are a few hundred MB at most
MAX_PICKLE_BYTES = 64 << 20  # a checkpoint's data.pkl holds names and shapes, the tensors are separate entries
MAX_REDIRECTS = 10
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

Progress = Callable[[int, int | None], None]
"""Called with (bytes of the file on disk, total bytes or None when the server does not say) as a download advances."""

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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one kind of checkpoint stores its network: top-level key, backbone key prefix, the other parts it must have."""

    container: str
    backbone_prefix: str
    other_parts: tuple[str, ...]


LAYOUTS = {
    zoo.COCO: _Layout("state_dict", "backbone.", ("neck.", "rpn_head.", "roi_head.")),
    zoo.IMAGENET: _Layout("model", "", ("head.",)),
}


class _Retryable(Exception):
    """An attempt that failed in a way another attempt may not: 5xx, a body cut short, an unusable partial answer."""


@dataclasses.dataclass(frozen=True)
class _Deadline:
    seconds: float
    end: float

    @classmethod
    def after(cls, seconds: float) -> _Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(self.end - time.monotonic(), 0.0)


def base_url() -> str:
    return (os.environ.get("RECNEXT_BASE_URL") or zoo.RELEASES_URL).rstrip("/")


def download_url(checkpoint: Checkpoint) -> str:
    return f"{base_url()}/{checkpoint.release_tag}/{checkpoint.file_name}"


def offline() -> bool:
    return os.environ.get("RECNEXT_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _http_allowed() -> bool:
    return os.environ.get("RECNEXT_ALLOW_HTTP", "").strip().lower() in {"1", "true", "yes", "on"}


def download_command(checkpoint: Checkpoint) -> str:
    """The command that fetches `checkpoint`, for messages that tell people what to run."""
    flag = " --pretrain" if checkpoint.kind == zoo.IMAGENET else ""
    return f"recnext download {checkpoint.model}{flag}"


def download_timeout(option: str | None = None) -> float:
    """Seconds one file may take, lock wait included: `option` (--timeout), else $RECNEXT_DOWNLOAD_TIMEOUT, else
    DEFAULT_DEADLINE_SECONDS."""
    name, value = ("--timeout", option) if option is not None else (
        "RECNEXT_DOWNLOAD_TIMEOUT", os.environ.get("RECNEXT_DOWNLOAD_TIMEOUT", "")
    )
    if not value.strip():
        return DEFAULT_DEADLINE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{name} {value!r} is not a positive number of seconds; e.g. 600")
    return seconds


def check_source(url: str) -> None:
    """Raise UsageError unless `url` may be downloaded from: https, or http from loopback or with RECNEXT_ALLOW_HTTP=1."""
    problem = _insecure(url)
    if problem:
        raise UsageError(f"{problem}; set RECNEXT_BASE_URL to an https mirror (http only from 127.0.0.1, ::1 or "
                         "localhost, or from any host with RECNEXT_ALLOW_HTTP=1)")


def _insecure(url: str) -> str | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url} is not an http(s) address recnext downloads from"
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS and not _http_allowed():
        return f"{url} is plain http, which anyone on the path can alter"
    return None


def ensure_checkpoint(name: str, pretrain: bool = False, progress: Progress | None = None) -> Path:
    """The verified local path of model `name`'s COCO checkpoint (or ImageNet pretraining one), downloading it if needed."""
    return ensure_file(zoo.get_checkpoint(name, pretrain), progress)


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
    deadline = _Deadline.after(download_timeout() if timeout is None else timeout)
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
            deadline: _Deadline, on_wait: Callable[[], None] | None) -> Path:
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
            check_structure(path, checkpoint)
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


# Structure check. torch.save writes a zip: <prefix>/data.pkl (a pickle that names tensors) and <prefix>/data/<key>
# (each storage's raw bytes). Reading the pickle with a closed set of inert stand-ins gives every tensor's shape
# without torch, and without running anything a file names: one reader for `download` on a machine without torch.


@dataclasses.dataclass(frozen=True)
class _StorageType:
    itemsize: int


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    numel: int
    itemsize: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _Tensor:
    integers = (storage_offset, *size, *stride)
    if not isinstance(storage, _Storage) or not all(type(n) is int and n >= 0 for n in integers) or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor with an impossible layout")
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


def _latin1(text, encoding="latin1") -> bytes:
    # pickle protocol 2 spells bytes as _codecs.encode(text, "latin1"); nothing else may reach this.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


class _Inert:
    """A numpy scalar or array from mmdet's meta: kept as a placeholder, never built."""

    def __init__(self, *args) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state


class _NumpyDType(_Inert):
    def __init__(self, code="", *args) -> None:
        # Numeric only, as the torch-side loader (compat.checkpoint) allows: object arrays hold arbitrary objects.
        if not isinstance(code, str) or code[:1] not in ("b", "i", "u", "f", "c", "?"):
            raise pickle.UnpicklingError(f"a numpy array of dtype {code!r}, which recnext does not load")
        super().__init__(code, *args)


_STORAGE_ITEMSIZES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): _Inert,
    ("numpy", "dtype"): _NumpyDType,
    **{(module, name): _Inert for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("scalar", "_reconstruct")},
    **{("torch", name): _StorageType(itemsize) for name, itemsize in _STORAGE_ITEMSIZES.items()},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names the Python object {module}.{name}, which recnext never loads") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"an unknown persistent reference {str(pid)[:80]}")
        return _Storage(pid[2], pid[4], pid[1].itemsize)


def read_checkpoint(path: Path, name: str | None = None) -> object:
    """`path`'s torch.save contents with each tensor as a _Tensor (storage, shape, stride); nothing named is run.

    Raises IntegrityError for files that are not a torch zip checkpoint, name objects outside the allow-list, or whose
    tensors reach past the bytes stored for them. Messages call the file `name` (default: its file name).
    """
    name = name or path.name
    try:
        with os.fdopen(cache.open_regular(path, os.O_RDONLY), "rb") as source, zipfile.ZipFile(source) as archive:
            pickles = [info for info in archive.infolist() if info.filename.count("/") == 1
                       and info.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError("not a checkpoint in the zip format torch.save writes since torch 1.6")
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise ValueError(f"its data.pkl is {pickles[0].file_size} bytes, over {MAX_PICKLE_BYTES}")
            prefix = pickles[0].filename.removesuffix("data.pkl")
            tensors: list[_Tensor] = []
            unpickler = _Unpickler(archive.open(pickles[0]))
            data = unpickler.load()
            _collect_tensors(data, tensors)
            sizes = {info.filename: info.file_size for info in archive.infolist()}
    except IntegrityError:
        raise
    except Exception as exc:  # BadZipFile, UnpicklingError, EOFError, ValueError, RecursionError…: not ours to read
        raise IntegrityError(f"{name} is not a checkpoint recnext reads safely: {exc}") from exc
    for tensor in tensors:
        stored = sizes.get(f"{prefix}data/{tensor.storage.key}")
        if stored is None or stored < tensor.storage.numel * tensor.storage.itemsize:
            raise IntegrityError(f"{name} lacks the bytes of storage {tensor.storage.key!r}: the file is damaged")
        last = tensor.offset + sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride))
        if all(tensor.shape) and last >= tensor.storage.numel:
            raise IntegrityError(f"{name} has a tensor reaching past storage {tensor.storage.key!r}: the file is damaged")
    return data


def _collect_tensors(value: object, found: list[_Tensor]) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def check_structure(path: Path, checkpoint: Checkpoint) -> None:
    """Raise IntegrityError unless `path` reads safely in `checkpoint`'s layout with the exact backbone keys and shapes."""
    layout = LAYOUTS[checkpoint.kind]
    data = read_checkpoint(path, checkpoint.file_name)
    state = data.get(layout.container) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise IntegrityError(
            f"{checkpoint.file_name} has no {layout.container!r} state dict, where {checkpoint.kind} checkpoints keep it"
        )
    backbone = {
        key.removeprefix(layout.backbone_prefix): value
        for key, value in state.items()
        if isinstance(key, str) and key.startswith(layout.backbone_prefix) and not key.startswith(layout.other_parts)
    }
    title = zoo.MODELS[checkpoint.model].title
    problems = []
    if not all(isinstance(value, _Tensor) for value in backbone.values()):
        problems.append("backbone entries that are not tensors")
    else:
        fingerprint = zoo.backbone_fingerprint({key: value.shape for key, value in backbone.items()})
        if fingerprint != zoo.MODELS[checkpoint.model].backbone:
            match = [zoo.MODELS[name].title for name, known in zoo.BACKBONE_FINGERPRINTS.items() if known == fingerprint]
            problems.append(f"it holds a {match[0]} backbone" if match else (
                f"its {len(backbone)} backbone tensors do not have {title}'s keys and shapes"
            ))
    absent = [part for part in layout.other_parts if not any(isinstance(key, str) and key.startswith(part) for key in state)]
    if absent:
        problems.append(f"no {', '.join(absent)} weights")
    if problems:
        raise IntegrityError(
            f"{checkpoint.file_name} does not hold a {title} {checkpoint.kind} checkpoint: {'; '.join(problems)}"
        )


# Downloads. Each writer streams into <name>.<random>.part, a file only it has open, so two writers never interleave
# bytes even where file locks are silently no-ops (Lustre, GPFS); <name>.part only holds a stopped download for the
# next run. Beside each .part, <.part>.json names the version its bytes belong to (the URL, the ETag or Last-Modified
# the server sent, the full size) and the file's inode, which a rename keeps: resuming asks for the rest with If-Range,
# so a server with a new version sends all of it instead of a tail that would splice two versions.


def _sidecar(part: Path) -> Path:
    return Path(f"{part}.json")


def _download(checkpoint: Checkpoint, path: Path, progress: Progress | None, accept_new_digest: bool,
              deadline: _Deadline) -> None:
    parked = Path(f"{path}.part")
    _tidy(path, parked)
    private = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.part")
    for source, target in ((parked, private), (_sidecar(parked), _sidecar(private))):
        try:
            os.replace(source, target)
        except FileNotFoundError:
            pass
    url = download_url(checkpoint)
    try:
        digest, size = _stream(url, private, progress, deadline, checkpoint.size)
    except BaseException:
        _park(private, parked)
        raise
    try:
        _accept(checkpoint, private, digest, size, accept_new_digest)
    except IntegrityError:
        _remove(private)
        raise
    except BaseException:
        # Interrupted while checking: keep the bytes for the next run.
        _park(private, parked)
        raise
    _sidecar(private).unlink(missing_ok=True)
    os.replace(private, path)


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


def _tidy(path: Path, parked: Path) -> None:
    """Expire an old stopped download, adopt what writers killed outright left behind, drop orphaned sidecars.

    Only private files nobody has written to for ABANDONED_SECONDS count as abandoned: a live download appends every
    chunk. The largest becomes <name>.part when there is none; the rest are deleted. Renames are atomic, so racing
    runs cannot share one.
    """
    for entry in (parked, _sidecar(parked)):
        _refuse_odd(entry)
    now = time.time()
    if _age(parked, now) > PARKED_SECONDS:
        _remove(parked)
    abandoned = []
    for candidate in path.parent.glob(f"{path.name}.*.part"):
        _refuse_odd(candidate)
        _refuse_odd(_sidecar(candidate))
        if _age(candidate, now) > ABANDONED_SECONDS:
            abandoned.append((candidate.lstat().st_size, candidate))
    for index, (_, candidate) in enumerate(sorted(abandoned, reverse=True)):
        if index == 0 and not os.path.lexists(parked) and os.path.lexists(_sidecar(candidate)):
            try:
                os.replace(_sidecar(candidate), _sidecar(parked))
                os.replace(candidate, parked)
            except FileNotFoundError:
                _remove(candidate)
        else:
            _remove(candidate)
    for sidecar in path.parent.glob(f"{path.name}*.part.json"):
        if not os.path.lexists(sidecar.with_suffix("")) and _age(sidecar, now) > ABANDONED_SECONDS:
            sidecar.unlink(missing_ok=True)


def _age(path: Path, now: float) -> float:
    """Seconds since `path` was last written, or -1 when it does not exist."""
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return -1.0


def _remove(part: Path) -> None:
    _sidecar(part).unlink(missing_ok=True)
    part.unlink(missing_ok=True)


def _park(private: Path, parked: Path) -> None:
    # Bytes without a sidecar have no version a server could confirm: a later run could not resume them.
    try:
        keep = private.lstat().st_size > 0 and _sidecar(private).is_file()
    except FileNotFoundError:
        keep = False
    if keep:
        os.replace(_sidecar(private), _sidecar(parked))
        os.replace(private, parked)
    else:
        _remove(private)


def _accept(checkpoint: Checkpoint, part: Path, digest: str, size: int, accept_new_digest: bool) -> None:
    """Raise IntegrityError unless downloaded bytes match the pinned or recorded digest and read as `checkpoint`."""
    source = download_url(checkpoint)
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
    check_structure(part, checkpoint)
    replace = accept_new_digest or checkpoint.pinned
    if cache.remember(checkpoint.file_name, cache.new_record(digest, size, source), replace).sha256 != digest:
        raise IntegrityError(
            f"another process recorded a different digest for {checkpoint.file_name} while this one downloaded it; "
            f"run `recnext verify {checkpoint.model}` to see which bytes are cached"
        )


def _hash_into(hasher, path: Path) -> int:
    size = 0
    with os.fdopen(cache.open_regular(path, os.O_RDONLY), "rb") as source:
        for block in iter(lambda: source.read(CHUNK_SIZE), b""):
            hasher.update(block)
            size += len(block)
    return size


class _PartFile:
    """A download in progress: its bytes on disk, their running SHA-256, and the version they belong to."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url
        self.size = 0
        self.version: tuple[str, str] | None = None  # ("ETag" or "Last-Modified", the value the server sent)
        self.total: int | None = None
        self._hash = hashlib.sha256()

    def __enter__(self) -> _PartFile:
        self._fd = cache.open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        info = os.fstat(self._fd)
        version, total = self._read_sidecar(info)
        if version is None or (total is not None and info.st_size > total):
            self.restart()
        else:
            self.version, self.total = version, total
            # The digest of a resumed download must cover the bytes an earlier attempt left on disk.
            while block := os.pread(self._fd, CHUNK_SIZE, self.size):
                self._hash.update(block)
                self.size += len(block)
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)

    def _read_sidecar(self, info: os.stat_result) -> tuple[tuple[str, str] | None, int | None]:
        sidecar = _sidecar(self.path)
        try:
            with os.fdopen(cache.open_regular(sidecar, os.O_RDONLY), "rb") as source:
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
        descriptor = cache.open_regular(_sidecar(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
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
        _sidecar(self.path).unlink(missing_ok=True)
        self._hash = hashlib.sha256()
        self.size = 0
        self.version = self.total = None

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _session() -> requests.Session:
    session = requests.Session()
    # No cookie is ever stored or sent: nothing a download server sets can follow a redirect to another host.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return session


def _stream(url: str, part: Path, progress: Progress | None, deadline: _Deadline,
            pinned_size: int | None) -> tuple[str, int]:
    """Append `url`'s remaining bytes to `part` until it is complete, retrying and resuming; returns (sha256, size).

    Gives up after more than RETRIES attempts in a row that kept no more bytes than the best attempt so far (bytes
    received and then discarded are no progress), or when the deadline passes.
    """
    stalled = 0  # attempts in a row that ended with no more bytes kept than the best before them
    with _PartFile(part, url) as out, _session() as session:
        best = out.size
        while True:
            try:
                _fetch_rest(session, url, out, progress, deadline, pinned_size)
                return out.hexdigest(), out.size
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retryable) as exc:
                if not deadline.remaining():
                    raise _deadline_error(url, out, deadline) from exc
                if isinstance(exc, requests.exceptions.SSLError):
                    raise DownloadError(f"cannot download {url}: TLS failed ({exc}); check the system certificates") from exc
                stalled = 0 if out.size > best else stalled + 1
                best = max(best, out.size)
                if stalled > RETRIES:
                    raise DownloadError(
                        f"cannot download {url}: {exc} (gave up: {stalled} attempts in a row kept no new bytes); "
                        f"{_kept(out)}"
                    ) from exc
                time.sleep(min(BACKOFF_SECONDS * 2 ** max(stalled - 1, 0), deadline.remaining()))
            except requests.RequestException as exc:
                raise DownloadError(f"cannot download {url}: {exc}") from exc


def _kept(out: _PartFile) -> str:
    if out.size and out.version:
        return f"the {out.size} bytes received are kept, run the same command again to resume"
    return "nothing was kept, run the same command again later"


def _deadline_error(url: str, out: _PartFile, deadline: _Deadline) -> DownloadError:
    return DownloadError(
        f"gave up on {url} after {deadline.seconds:g} s (the limit set by --timeout or RECNEXT_DOWNLOAD_TIMEOUT); "
        f"{_kept(out)}"
    )


def _fetch_rest(session: requests.Session, url: str, out: _PartFile, progress: Progress | None,
                deadline: _Deadline, pinned_size: int | None) -> None:
    # identity: with a compressed body, Content-Length would not count the bytes iter_content yields.
    headers = {"Accept-Encoding": "identity"}
    if out.size and out.version:
        headers["Range"] = f"bytes={out.size}-"
        headers["If-Range"] = out.version[1]
    elif out.size:
        out.restart()
    with _open(session, url, headers, deadline) as response:
        if response.status_code == 416 and _same_version(response, out) and out.size == out.total \
                and _content_range(response.headers.get("Content-Range", ""))[1] == out.size:
            return  # the kept bytes are already the whole file (an earlier run stopped before verifying them)
        total = _expected_total(url, response, out, pinned_size)
        limit = total if total is not None else MAX_DOWNLOAD_BYTES
        # urllib3 2.x would raise on a short body and drop the part of a chunk that did arrive; with this off the
        # bytes are kept and the size check below notices the truncation (as it must anyway under urllib3 1.x).
        response.raw.enforce_content_length = False
        # Each read waits at most TIMEOUT[1] for bytes, but a trickle of a byte a second never trips that: at the
        # deadline the socket is shut, which ends the body at once.
        watchdog = threading.Timer(deadline.remaining(), _shut, (response,))
        watchdog.start()
        try:
            for chunk in response.iter_content(CHUNK_SIZE):
                if out.size + len(chunk) > limit:
                    out.restart()
                    if total is None:
                        raise DownloadError(
                            f"{url} sent more than {MAX_DOWNLOAD_BYTES} bytes, the cap for unpinned checkpoints; "
                            "nothing was kept. Check RECNEXT_BASE_URL"
                        )
                    raise _Retryable(f"{url} sent more bytes than the {total} it announced")
                out.append(chunk)
                if progress is not None:
                    progress(out.size, total)
        finally:
            watchdog.cancel()
    if not deadline.remaining():
        raise _Retryable("the deadline passed")  # the watchdog may have ended a body of unknown length early
    if total is not None and out.size < total:
        raise _Retryable(f"the connection closed after {out.size} of {total} bytes")


def _shut(response: requests.Response) -> None:
    # Through a duplicate of the descriptor: http.client detaches the socket object from its connection for bodies
    # that end when the connection closes, but shutting any descriptor of a socket ends every read on it.
    try:
        with socket.socket(fileno=os.dup(response.raw.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass  # the body ended and the connection closed meanwhile


def _open(session: requests.Session, url: str, headers: dict[str, str], deadline: _Deadline) -> requests.Response:
    """GET `url` following redirects by hand: never from https to http, never to a scheme or host check_source refuses,
    and with credentials from the URL only for its own host (port and scheme included)."""
    origin = urllib.parse.urlsplit(url)
    username, password = requests.utils.get_auth_from_url(url)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        same_origin = (parts.scheme, parts.hostname, parts.port) == (origin.scheme, origin.hostname, origin.port)
        remaining = deadline.remaining()
        if not remaining:
            raise _Retryable("no time left before the deadline")
        timeout = (min(TIMEOUT[0], remaining), min(TIMEOUT[1], remaining))
        auth = (username, password) if same_origin and (username or password) else None
        response = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=False, auth=auth)
        if not response.is_redirect:
            return response
        target = urllib.parse.urljoin(url, response.headers["Location"])
        response.close()
        if parts.scheme == "https" and urllib.parse.urlsplit(target).scheme != "https":
            raise DownloadError(f"{url} redirected to {target}, from https to an insecure address; refused")
        problem = _insecure(target)
        if problem:
            raise DownloadError(f"{url} redirected to {target}: {problem}; refused")
        url = target
    raise DownloadError(f"{url} redirected more than {MAX_REDIRECTS} times; refused")


def _validator(response: requests.Response) -> tuple[str, str] | None:
    """What If-Range can name to get the rest of this very version: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag", "")
    if etag.startswith('"'):
        return ("ETag", etag)
    modified = response.headers.get("Last-Modified")
    return ("Last-Modified", modified) if modified else None


def _same_version(response: requests.Response, out: _PartFile) -> bool:
    return out.version is not None and response.headers.get(out.version[0]) == out.version[1]


def _expected_total(url: str, response: requests.Response, out: _PartFile, pinned_size: int | None) -> int | None:
    """The file's full size from the response headers, after making `out` ready to take this response's body."""
    status = response.status_code
    if status == 416:
        # The kept bytes are not a prefix of the current file (or their version cannot be confirmed): start over.
        out.restart()
        raise _Retryable(f"{url} refused to resume at byte {response.request.headers.get('Range')}")
    if status >= 500:
        raise _Retryable(f"{url} answered {status} {response.reason}")
    if status not in (200, 206):
        raise DownloadError(
            f"{url} answered {status} {response.reason}; check that the release has this file and that the download "
            f"base {base_url()} (set by $RECNEXT_BASE_URL) is right"
        )
    if status == 206:
        start, total = _content_range(response.headers.get("Content-Range", ""))
        if start == out.size and total == out.total and total is not None and _same_version(response, out):
            return total
        # Not the tail of the version on disk (another version, another start, a server ignoring If-Range): appending
        # it would splice two files, so ask for the whole file instead.
        out.restart()
        raise _Retryable(f"{url} answered a resume with {response.headers.get('Content-Range')!r} of another version")
    # 200 is the whole file: a fresh download, a server that ignores Range, or a new version If-Range detected.
    length = response.headers.get("Content-Length", "")
    total = int(length) if length.isdigit() else None
    if pinned_size is not None and total is not None and total != pinned_size:
        out.restart()
        raise IntegrityError(f"{url} announces {total} bytes where the zoo pins {pinned_size}; nothing was downloaded")
    if total is not None and total > MAX_DOWNLOAD_BYTES:
        out.restart()
        raise DownloadError(
            f"{url} announces {total} bytes, over the {MAX_DOWNLOAD_BYTES}-byte cap for unpinned checkpoints; "
            "nothing was downloaded. Check RECNEXT_BASE_URL"
        )
    out.begin(_validator(response), total if total is not None else pinned_size)
    return out.total


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, full size) from a Content-Range header ("bytes 100-999/1000", "bytes */1000"); None where unsaid."""
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    start = span.partition("-")[0]
    if unit != "bytes":
        return None, None
    return int(start) if start.isdigit() else None, int(total) if total.isdigit() else None
