"""Release checkpoints into the cache: resumable HTTP downloads, hashed while streaming, verified, renamed into place."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import requests
from filelock import FileLock

from recnext_cli import cache, zoo
from recnext_cli.errors import DownloadError, IntegrityError
from recnext_cli.zoo import Checkpoint

CHUNK_SIZE = 1 << 20
TIMEOUT = (10, 60)  # seconds to connect, and to wait for the next bytes of a body
RETRIES = 5  # failed attempts in a row that moved the download no further
BACKOFF_SECONDS = 1.0  # doubled after every further failed attempt
ABANDONED_SECONDS = 600  # a private .part untouched this long belongs to a writer that was killed

Progress = Callable[[int, int | None], None]
"""Called with (bytes of the file on disk, total bytes or None when the server does not say) as a download advances."""

MISSING = "missing"
UNVERIFIED = "unverified"
VERIFIED = "verified"
FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class FileState:
    """What the cache holds for one checkpoint: MISSING, UNVERIFIED (present, never checked), VERIFIED or FAILED."""

    checkpoint: Checkpoint
    path: Path
    status: str
    detail: str = ""


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


def base_url() -> str:
    return (os.environ.get("RECNEXT_BASE_URL") or zoo.RELEASES_URL).rstrip("/")


def download_url(checkpoint: Checkpoint) -> str:
    return f"{base_url()}/{checkpoint.release_tag}/{checkpoint.file_name}"


def offline() -> bool:
    return os.environ.get("RECNEXT_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_command(checkpoint: Checkpoint) -> str:
    """The command that fetches `checkpoint`, for messages that tell people what to run."""
    flag = " --pretrain" if checkpoint.kind == zoo.IMAGENET else ""
    return f"recnext download {checkpoint.model}{flag}"


def ensure_checkpoint(name: str, pretrain: bool = False, progress: Progress | None = None) -> Path:
    """The verified local path of model `name`'s COCO checkpoint (or ImageNet pretraining one), downloading it if needed."""
    return ensure_file(zoo.get_checkpoint(name, pretrain), progress)


def ensure_file(
    checkpoint: Checkpoint,
    progress: Progress | None = None,
    *,
    force: bool = False,
    accept_new_digest: bool = False,
) -> Path:
    """The verified local path of `checkpoint`, downloading it first when it is missing or fails its digest check.

    force fetches the file again even when the cached copy is good; bytes whose digest disagrees with the recorded
    one are refused (the cached file stays) unless accept_new_digest is set. Safe to call from many processes at once:
    one downloads, the others wait on a lock and return the finished file.
    """
    path = cache.checkpoint_path(checkpoint.file_name)
    if force:
        reason = f"fetching {checkpoint.file_name} again was requested"
    else:
        state = verify_cached(checkpoint, recheck_structure=False)
        if state.status == VERIFIED:
            return path
        reason = f"{checkpoint.file_name} is not in the cache" if state.status == MISSING else (
            f"the cached {checkpoint.file_name} failed its check ({state.detail})"
        )
    if offline():
        raise DownloadError(
            f"{reason} and RECNEXT_OFFLINE is set, so nothing is downloaded; run `{download_command(checkpoint)}` "
            f"where the network is reachable (with the same RECNEXT_HOME), or copy {download_url(checkpoint)} to {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        # Another process may have finished the download while this one waited for the lock.
        if not force and verify_cached(checkpoint, recheck_structure=False).status == VERIFIED:
            return path
        _download(checkpoint, path, progress, accept_new_digest)
    return path


def cached_state(checkpoint: Checkpoint) -> FileState:
    """What the cache holds for `checkpoint`, from the manifest and the file size alone (no hashing, no torch)."""
    path = cache.checkpoint_path(checkpoint.file_name)
    if not path.is_file():
        return FileState(checkpoint, path, MISSING)
    record = cache.recorded(checkpoint.file_name)
    if record is None:
        return FileState(checkpoint, path, UNVERIFIED, "present but never verified; run `recnext verify`")
    size = path.stat().st_size
    if size != record.size:
        return FileState(checkpoint, path, FAILED, f"{size} bytes, but {record.size} were verified; run `recnext verify`")
    return FileState(checkpoint, path, VERIFIED)


def verify_cached(checkpoint: Checkpoint, recheck_structure: bool = True) -> FileState:
    """Re-hash `checkpoint`'s cached file and compare it with the pinned or recorded digest.

    A file with no record yet must also pass check_structure and is then recorded (trust on first use).
    recheck_structure=False skips loading a file whose digest equals its record: those bytes were checked on arrival.
    """
    path = cache.checkpoint_path(checkpoint.file_name)
    if not path.is_file():
        return FileState(checkpoint, path, MISSING, f"not downloaded; run `{download_command(checkpoint)}`")
    hasher = hashlib.sha256()
    size = _hash_into(hasher, path)
    digest = hasher.hexdigest()
    record = cache.recorded(checkpoint.file_name)
    problem = _pin_problem(checkpoint, digest, size)
    if problem is None and checkpoint.sha256 is None and record is not None and record.sha256 != digest:
        problem = f"sha256 {digest[:16]}… differs from {record.sha256[:16]}… recorded when it was first verified"
    if problem is not None:
        return FileState(checkpoint, path, FAILED, f"{problem}; run `{download_command(checkpoint)} --force` to fetch it again")
    if record is None or recheck_structure:
        try:
            check_structure(path, checkpoint)
        except IntegrityError as exc:
            return FileState(checkpoint, path, FAILED, str(exc))
    if record is None:
        if cache.remember(checkpoint.file_name, cache.Record(digest, size)).sha256 != digest:
            return FileState(checkpoint, path, FAILED, "another process recorded a different digest for it just now")
        return FileState(checkpoint, path, VERIFIED, "first use: digest recorded")
    return FileState(checkpoint, path, VERIFIED)


def check_structure(path: Path, checkpoint: Checkpoint) -> None:
    """Raise IntegrityError unless `path` loads weights-only in `checkpoint`'s layout with the exact backbone shapes."""
    import torch

    from recnext_cli.compat.checkpoint import load_from_local
    from recnext_cli.nn.recnext import backbone_state_shapes

    layout = LAYOUTS[checkpoint.kind]
    try:
        data = load_from_local(str(path), map_location="cpu")
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError…: whatever torch refuses is not a checkpoint here
        raise IntegrityError(
            f"{path.name} is not a checkpoint torch loads safely (weights_only=True): {_load_failure(exc)}"
        ) from exc
    state = data.get(layout.container) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise IntegrityError(f"{path.name} has no {layout.container!r} state dict, where {checkpoint.kind} checkpoints keep it")
    backbone = {
        key.removeprefix(layout.backbone_prefix): tuple(value.shape) if isinstance(value, torch.Tensor) else None
        for key, value in state.items()
        if key.startswith(layout.backbone_prefix) and not key.startswith(layout.other_parts)
    }
    problems = _shape_problems(backbone_state_shapes(checkpoint.model), backbone)
    absent = [part for part in layout.other_parts if not any(key.startswith(part) for key in state)]
    if absent:
        problems.append(f"no {', '.join(absent)} weights")
    if problems:
        raise IntegrityError(
            f"{path.name} does not hold a RecNeXt-{checkpoint.model.upper()} {checkpoint.kind} checkpoint: {'; '.join(problems)}"
        )


def _shape_problems(expected: dict[str, tuple], found: dict[str, tuple | None]) -> list[str]:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")

    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [f"{key} {found[key]} not {expected[key]}" for key in expected if key in found and found[key] != expected[key]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} backbone keys missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected backbone keys ({some(unexpected)})")
    if reshaped:
        problems.append(f"{len(reshaped)} backbone tensors with other shapes ({some(reshaped)})")
    return problems


def _load_failure(exc: Exception) -> str:
    # torch's weights_only message starts with pages of generic advice; the reason follows this marker.
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    return " ".join(text.split())[:300]


def _pin_problem(checkpoint: Checkpoint, digest: str, size: int) -> str | None:
    if checkpoint.size is not None and size != checkpoint.size:
        return f"{size} bytes where the zoo pins {checkpoint.size}"
    if checkpoint.sha256 is not None and digest != checkpoint.sha256:
        return f"sha256 {digest[:16]}… where the zoo pins {checkpoint.sha256[:16]}…"
    return None


def _adopt_abandoned(path: Path, parked: Path) -> None:
    """Give the next run what writers killed outright (SIGKILL, a Slurm time limit) left in their private files.

    Only files nobody has written to for ABANDONED_SECONDS count: a live download appends every chunk. The largest
    becomes <name>.part when there is none; the rest are deleted. Renames are atomic, so racing runs cannot share one.
    """
    now = time.time()
    abandoned = []
    for candidate in path.parent.glob(f"{path.name}.*.part"):
        try:
            stat = candidate.stat()
        except FileNotFoundError:
            continue
        if now - stat.st_mtime > ABANDONED_SECONDS:
            abandoned.append((stat.st_size, candidate))
    for index, (_, candidate) in enumerate(sorted(abandoned, reverse=True)):
        try:
            if index == 0 and not parked.exists():
                os.replace(candidate, parked)
            else:
                candidate.unlink()
        except FileNotFoundError:
            continue


def _download(checkpoint: Checkpoint, path: Path, progress: Progress | None, accept_new_digest: bool) -> None:
    parked = path.with_name(f"{path.name}.part")
    _adopt_abandoned(path, parked)
    # Each writer streams into a file that only it has open, so two writers can never interleave bytes, even where
    # file locks are silently no-ops (Lustre, GPFS). <name>.part only holds a stopped download for the next run.
    private = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        os.replace(parked, private)
    except FileNotFoundError:
        pass
    try:
        digest, size = _stream(download_url(checkpoint), private, progress)
    except BaseException:
        _park(private, parked)
        raise
    try:
        _accept(checkpoint, private, digest, size, accept_new_digest)
    except IntegrityError:
        private.unlink()
        raise
    except BaseException:
        # Interrupted while checking (the torch import alone takes seconds): keep the bytes for the next run.
        _park(private, parked)
        raise
    os.replace(private, path)


def _park(private: Path, parked: Path) -> None:
    if private.exists() and private.stat().st_size:
        os.replace(private, parked)
    else:
        private.unlink(missing_ok=True)


def _accept(checkpoint: Checkpoint, part: Path, digest: str, size: int, accept_new_digest: bool) -> None:
    """Raise IntegrityError unless downloaded bytes match the pinned or recorded digest and load as `checkpoint`."""
    source = download_url(checkpoint)
    problem = _pin_problem(checkpoint, digest, size)
    if problem is not None:
        raise IntegrityError(
            f"{source} sent {problem}; nothing was cached. If the release was re-published on purpose, "
            "the pin in recnext_cli/zoo.py needs updating"
        )
    record = cache.recorded(checkpoint.file_name)
    if checkpoint.sha256 is None and record is not None and record.sha256 != digest and not accept_new_digest:
        raise IntegrityError(
            f"{source} sent bytes with sha256 {digest[:16]}…, but {record.sha256[:16]}… was recorded when "
            f"{checkpoint.file_name} was first downloaded; the cached file (if any) was kept. If the release was "
            f"re-published on purpose, run `{download_command(checkpoint)} --force --accept-new-digest`"
        )
    check_structure(part, checkpoint)
    replace = accept_new_digest or checkpoint.sha256 is not None
    if cache.remember(checkpoint.file_name, cache.Record(digest, size), replace).sha256 != digest:
        raise IntegrityError(
            f"another process recorded a different digest for {checkpoint.file_name} while this one downloaded it; "
            f"run `recnext verify {checkpoint.model}` to see which bytes are cached"
        )


class _PartFile:
    """A download in progress: its bytes on disk and their running SHA-256, always describing the same data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.received = 0  # bytes that arrived in this process, whether or not they were later discarded
        self._hash = hashlib.sha256()

    def __enter__(self) -> _PartFile:
        self._file = self.path.open("ab")
        # The digest of a resumed download must cover the bytes an earlier attempt left on disk.
        self.size = _hash_into(self._hash, self.path)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()

    def append(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)
        self.received += len(chunk)

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.size = 0

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _hash_into(hasher: hashlib._Hash, path: Path) -> int:
    size = 0
    with path.open("rb") as source:
        for block in iter(lambda: source.read(CHUNK_SIZE), b""):
            hasher.update(block)
            size += len(block)
    return size


def _stream(url: str, part: Path, progress: Progress | None) -> tuple[str, int]:
    """Append `url`'s remaining bytes to `part` until it is complete, retrying and resuming; returns (sha256, size)."""
    failures = 0
    with _PartFile(part) as out, requests.Session() as session:
        while True:
            received = out.received
            try:
                _fetch_rest(session, url, out, progress)
                return out.hexdigest(), out.size
            except requests.exceptions.SSLError as exc:
                raise DownloadError(f"cannot download {url}: TLS failed ({exc}); check the system certificates") from exc
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retryable) as exc:
                # An attempt that brought new bytes does not use up the retry budget: long downloads on flaky links finish.
                failures = 1 if out.received > received else failures + 1
                if failures > RETRIES:
                    raise DownloadError(
                        f"cannot download {url}: {exc} (gave up after {RETRIES} retries); the {out.size} bytes received "
                        "are kept, run the same command again to resume"
                    ) from exc
                time.sleep(BACKOFF_SECONDS * 2 ** (failures - 1))
            except requests.RequestException as exc:
                raise DownloadError(f"cannot download {url}: {exc}") from exc


def _fetch_rest(session: requests.Session, url: str, out: _PartFile, progress: Progress | None) -> None:
    # identity: with a compressed body, Content-Length would not count the bytes iter_content yields.
    headers = {"Accept-Encoding": "identity"}
    if out.size:
        headers["Range"] = f"bytes={out.size}-"
    with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
        if response.status_code == 416 and _content_range(response.headers.get("Content-Range", ""))[1] == out.size:
            return  # the kept bytes are already the whole file (an earlier run stopped before verifying them)
        total = _expected_total(url, response, out)
        # urllib3 2.x would raise on a short body and drop the part of a chunk that did arrive; with this off the
        # bytes are kept and the size check below notices the truncation (as it must anyway under urllib3 1.x).
        response.raw.enforce_content_length = False
        for chunk in response.iter_content(CHUNK_SIZE):
            out.append(chunk)
            if progress is not None:
                progress(out.size, total)
    if total is not None and out.size < total:
        raise _Retryable(f"the connection closed after {out.size} of {total} bytes")


def _expected_total(url: str, response: requests.Response, out: _PartFile) -> int | None:
    """The file's full size from the response headers, after making `out` ready to take this response's body."""
    status = response.status_code
    if status == 416:
        # The kept bytes are as long as the file or longer, so they are not a prefix of it: start over.
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
        if start == out.size:
            return total
        # A part that does not start where the kept bytes end cannot be appended: ask for the whole file instead.
        out.restart()
        raise _Retryable(f"{url} answered a Range request with {response.headers.get('Content-Range')!r}")
    # 200 is the whole file, also when a Range was asked for and the server ignores Range.
    out.restart()
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, full size) from a Content-Range header ("bytes 100-999/1000", "bytes */1000"); None where unsaid."""
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    start = span.partition("-")[0]
    if unit != "bytes":
        return None, None
    return int(start) if start.isdigit() else None, int(total) if total.isdigit() else None
