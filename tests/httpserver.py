"""A real threaded HTTP(S) file server on 127.0.0.1 with switchable faults, and the tiny real checkpoints it serves."""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import hashlib
import io
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Fault:
    """What to do to one request instead of serving it whole."""

    status: int | None = None  # answer with this HTTP status and an empty body
    cut_after: int | None = None  # send this many body bytes, then reset the connection (RST)
    truncate_after: int | None = None  # send this many body bytes, then close cleanly although Content-Length said more
    corrupt_at: int | None = None  # flip the bits of the body byte at this offset (of this response's body)
    publish: bytes | None = None  # first replace the requested file with these bytes: a new version of it
    redirect: str | None = None  # answer 302 with Location: this base address + the requested path
    ignore_range: bool = False  # answer 200 with the whole file although a Range was asked
    ignore_if_range: bool = False  # serve the asked Range although If-Range names another version (a broken server)
    delay: float = 0.0  # seconds between chunks of this response: a slow trickle
    content_length: int | None = None  # announce this Content-Length instead of the true one
    chunked: bool = False  # send no Content-Length, but Transfer-Encoding: chunked
    unframed: bool = False  # send neither: the body ends when the server closes the connection
    set_cookie: str | None = None  # a Set-Cookie header on this response


@dataclasses.dataclass
class Served:
    """One request as the server saw it, and how many body bytes it handed to the socket."""

    path: str
    range_start: int | None
    if_range: str | None = None
    authorization: str | None = None
    cookie: str | None = None
    status: int = 0
    sent: int = 0


def etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:20]}"'


def last_modified(body: bytes) -> str:
    # A date that differs between versions (to the second, as HTTP dates go) and stays the same for one version.
    seconds = 1_600_000_000 + int(hashlib.sha256(body).hexdigest()[:7], 16)
    return email.utils.formatdate(seconds, usegmt=True)


class FileServer:
    """Serves `files` ({url path: bytes}); each request takes the next queued Fault, if any.

    validators: which of ETag / Last-Modified responses carry ("both", "etag", "last-modified", "none").
    """

    def __init__(self, files: dict[str, bytes] | None = None, chunk_size: int = 16 * 1024,
                 tls: ssl.SSLContext | None = None) -> None:
        self.files = dict(files or {})
        self.faults: list[Fault] = []
        self.supports_range = True
        self.validators = "both"
        self.chunk_size = chunk_size
        self.chunk_delay = 0.0  # seconds between chunks, to make concurrent downloads overlap
        self.log: list[Served] = []
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self._scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{self._scheme}://{host}:{port}"

    def bytes_sent(self) -> int:
        with self._lock:
            return sum(entry.sent for entry in self.log)

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            fault = self.faults.pop(0) if self.faults else Fault()
            entry = Served(handler.path, _range_start(handler.headers.get("Range")), handler.headers.get("If-Range"),
                           handler.headers.get("Authorization"), handler.headers.get("Cookie"))
            self.log.append(entry)
            if fault.publish is not None:
                self.files[handler.path] = fault.publish
        extra = {"Set-Cookie": fault.set_cookie} if fault.set_cookie else {}
        if fault.redirect is not None:
            entry.status = 302
            _empty(handler, 302, {"Location": fault.redirect + handler.path, **extra})
            return
        body = self.files.get(handler.path)
        if fault.status is not None or body is None:
            entry.status = fault.status or 404
            _empty(handler, entry.status, extra)
            return
        validators = self._validators(body)
        start = entry.range_start if self.supports_range and not fault.ignore_range else None
        if start is not None and entry.if_range is not None and not fault.ignore_if_range \
                and entry.if_range not in validators.values():
            start = None  # RFC 9110: a Range whose If-Range names another version gets the whole current file
        if start is not None and start >= len(body):
            entry.status = 416
            _empty(handler, 416, {"Content-Range": f"bytes */{len(body)}", **validators, **extra})
            return
        entry.status = 200 if start is None else 206
        payload = bytearray(body[start or 0:])
        if fault.corrupt_at is not None and fault.corrupt_at < len(payload):
            payload[fault.corrupt_at] ^= 0xFF
        handler.send_response(entry.status)
        for name, value in {**validators, **extra}.items():
            handler.send_header(name, value)
        if fault.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        elif fault.unframed:
            handler.close_connection = True
        else:
            handler.send_header("Content-Length", str(fault.content_length if fault.content_length is not None
                                                      else len(payload)))
        if self.supports_range:
            handler.send_header("Accept-Ranges", "bytes")
        if start is not None:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.end_headers()
        limit = next((n for n in (fault.cut_after, fault.truncate_after) if n is not None), len(payload))
        delay = fault.delay or self.chunk_delay
        try:
            for offset in range(0, min(limit, len(payload)), self.chunk_size):
                chunk = bytes(payload[offset:min(offset + self.chunk_size, limit)])
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if fault.chunked else chunk)
                with self._lock:
                    entry.sent += len(chunk)
                if delay:
                    time.sleep(delay)
            if fault.chunked and limit >= len(payload):
                handler.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up: nothing more to send
            handler.close_connection = True
            return
        if limit < len(payload) or fault.content_length is not None:
            handler.close_connection = True  # a body that ended short of what was announced can only end by closing
        if fault.cut_after is not None:
            # Give the client time to take the bytes off the wire, then reset: linger 0 makes close() send RST.
            time.sleep(0.05)
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()

    def _validators(self, body: bytes) -> dict[str, str]:
        chosen = {"ETag": etag(body), "Last-Modified": last_modified(body)}
        keep = {"both": ("ETag", "Last-Modified"), "etag": ("ETag",), "last-modified": ("Last-Modified",), "none": ()}
        return {name: value for name, value in chosen.items() if name in keep[self.validators]}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that hangs up or gives up mid-response is what these tests provoke; anything else is a bug here.
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive like real servers, so a fault must end the connection itself

        def do_GET(self) -> None:
            server.serve(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def _empty(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def _range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes="):
        return None
    start = value.removeprefix("bytes=").partition("-")[0]
    return int(start) if start.isdigit() else None


def tls_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1, and the certificate file to trust."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


@functools.lru_cache(maxsize=None)
def checkpoint_bytes(model: str, kind: str, seed: int = 0, pad: int = 0, numpy_meta: bool = False) -> bytes:
    """A real torch.save checkpoint in the release layout for `kind`, with `model`'s exact backbone keys and shapes.

    Backbone tensors are stride-0 views of one random value, so the file stays small whatever the model;
    `pad` random float32 values in the neck (or head) make it large enough to be cut mid-way.
    """
    import numpy
    import torch

    from recnext_cli.nn.recnext import backbone_state_shapes

    generator = torch.Generator().manual_seed(seed)
    backbone = {key: torch.randn((), generator=generator).expand(shape) for key, shape in backbone_state_shapes(model).items()}
    filler = torch.randn(pad, generator=generator)
    if kind == "coco":
        meta = {"mmdet_version": "2.28.2", "CLASSES": ("person", "bicycle"), "epoch": 12}
        if numpy_meta:
            meta["hook_msgs"] = {"best_score": numpy.float64(0.417), "scores": numpy.arange(3.0), "iter": numpy.int64(7)}
        state = {f"backbone.{key}": value for key, value in backbone.items()}
        state.update({"neck.fpn_convs.0.conv.weight": filler, "rpn_head.rpn_cls.weight": torch.zeros(3, 256, 1, 1),
                      "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 16)})
        data = {"meta": meta, "state_dict": state}
    else:
        data = {"model": {**backbone, "head.head.linear.weight": filler, "head.head_dist.linear.weight": torch.zeros(10, 4)}}
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()
