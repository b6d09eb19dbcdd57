"""Fetch one URL's bytes over HTTP(S): redirects and the https policy, deadlines, retries with backoff, and resuming
only from the same file version (Range with If-Range)."""

from __future__ import annotations

import dataclasses
import http.cookiejar
import os
import socket
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Callable

import requests

from recnext_cli import zoo
from recnext_cli.errors import DownloadError, IntegrityError, UsageError
from recnext_cli.zoo import Checkpoint

if TYPE_CHECKING:
    from recnext_cli.fetch.parts import PartFile

CHUNK_SIZE = 1 << 20
TIMEOUT = (10, 60)  # seconds to connect, and to wait for the next bytes of a body
RETRIES = 5  # attempts in a row that kept no more bytes than the best attempt before them
BACKOFF_SECONDS = 1.0  # doubled after every further failed attempt
DEFAULT_DEADLINE_SECONDS = 3600.0  # for one file, lock wait included; RECNEXT_DOWNLOAD_TIMEOUT or --timeout change it
MAX_DOWNLOAD_BYTES = 1 << 30  # the most an unpinned file may be; release checkpoints are a few hundred MB at most
MAX_REDIRECTS = 10
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

Progress = Callable[[int, int | None], None]
"""Called with (bytes of the file on disk, total bytes or None when the server does not say) as a download advances."""


class _Retryable(Exception):
    """An attempt that failed in a way another attempt may not: 5xx, a body cut short, an unusable partial answer."""


@dataclasses.dataclass(frozen=True)
class Deadline:
    """When one file's time runs out: the limit it was given and the monotonic clock reading at which it ends."""

    seconds: float
    end: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(self.end - time.monotonic(), 0.0)


def base_url() -> str:
    return (os.environ.get("RECNEXT_BASE_URL") or zoo.RELEASES_URL).rstrip("/")


def download_url(checkpoint: Checkpoint) -> str:
    return f"{base_url()}/{checkpoint.release_tag}/{checkpoint.file_name}"


def _http_allowed() -> bool:
    return os.environ.get("RECNEXT_ALLOW_HTTP", "").strip().lower() in {"1", "true", "yes", "on"}


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


def _session() -> requests.Session:
    session = requests.Session()
    # No cookie is ever stored or sent: nothing a download server sets can follow a redirect to another host.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return session


def stream(url: str, out: PartFile, progress: Progress | None, deadline: Deadline,
           pinned_size: int | None) -> tuple[str, int]:
    """Append `url`'s remaining bytes to `out` until it is complete, retrying and resuming; returns (sha256, size).

    Gives up after more than RETRIES attempts in a row that kept no more bytes than the best attempt so far (bytes
    received and then discarded are no progress), or when the deadline passes.
    """
    stalled = 0  # attempts in a row that ended with no more bytes kept than the best before them
    with _session() as session:
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
                wait_before_retry(min(BACKOFF_SECONDS * 2 ** max(stalled - 1, 0), deadline.remaining()))
            except requests.RequestException as exc:
                raise DownloadError(f"cannot download {url}: {exc}") from exc


def wait_before_retry(seconds: float) -> None:
    """The pause between two attempts; its own function, so that tests record pauses without replacing time.sleep
    for every thread of the process."""
    time.sleep(seconds)


def _kept(out: PartFile) -> str:
    if out.size and out.version:
        return f"the {out.size} bytes received are kept, run the same command again to resume"
    return "nothing was kept, run the same command again later"


def _deadline_error(url: str, out: PartFile, deadline: Deadline) -> DownloadError:
    return DownloadError(
        f"gave up on {url} after {deadline.seconds:g} s (the limit set by --timeout or RECNEXT_DOWNLOAD_TIMEOUT); "
        f"{_kept(out)}"
    )


def _fetch_rest(session: requests.Session, url: str, out: PartFile, progress: Progress | None,
                deadline: Deadline, pinned_size: int | None) -> None:
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


def _open(session: requests.Session, url: str, headers: dict[str, str], deadline: Deadline) -> requests.Response:
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


def _same_version(response: requests.Response, out: PartFile) -> bool:
    return out.version is not None and response.headers.get(out.version[0]) == out.version[1]


def _expected_total(url: str, response: requests.Response, out: PartFile, pinned_size: int | None) -> int | None:
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
