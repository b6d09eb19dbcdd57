"""A real threaded HTTP file server on 127.0.0.1 with switchable faults, and the tiny real checkpoints it serves."""

from __future__ import annotations

import dataclasses
import functools
import io
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclasses.dataclass(frozen=True)
class Fault:
    """What to do to one request instead of serving it whole."""

    status: int | None = None  # answer with this HTTP status and an empty body
    cut_after: int | None = None  # send this many body bytes, then reset the connection (RST)
    truncate_after: int | None = None  # send this many body bytes, then close cleanly although Content-Length said more


@dataclasses.dataclass
class Served:
    """One request as the server saw it, and how many body bytes it handed to the socket."""

    path: str
    range_start: int | None
    status: int = 0
    sent: int = 0


class FileServer:
    """Serves `files` ({url path: bytes}); each request takes the next queued Fault, if any."""

    def __init__(self, files: dict[str, bytes] | None = None, chunk_size: int = 16 * 1024) -> None:
        self.files = dict(files or {})
        self.faults: list[Fault] = []
        self.supports_range = True
        self.chunk_size = chunk_size
        self.chunk_delay = 0.0  # seconds between chunks, to make concurrent downloads overlap
        self.log: list[Served] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
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
        return f"http://{host}:{port}"

    def bytes_sent(self) -> int:
        with self._lock:
            return sum(entry.sent for entry in self.log)

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            fault = self.faults.pop(0) if self.faults else Fault()
            entry = Served(handler.path, _range_start(handler.headers.get("Range")))
            self.log.append(entry)
        body = self.files.get(handler.path)
        if fault.status is not None or body is None:
            entry.status = fault.status or 404
            _empty(handler, entry.status)
            return
        start = entry.range_start if self.supports_range and entry.range_start is not None else None
        if start is not None and start >= len(body):
            entry.status = 416
            _empty(handler, 416, {"Content-Range": f"bytes */{len(body)}"})
            return
        entry.status = 200 if start is None else 206
        payload = body[start or 0:]
        handler.send_response(entry.status)
        handler.send_header("Content-Length", str(len(payload)))
        if self.supports_range:
            handler.send_header("Accept-Ranges", "bytes")
        if start is not None:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.end_headers()
        limit = next((n for n in (fault.cut_after, fault.truncate_after) if n is not None), len(payload))
        for offset in range(0, limit, self.chunk_size):
            chunk = payload[offset:min(offset + self.chunk_size, limit)]
            handler.wfile.write(chunk)
            with self._lock:
                entry.sent += len(chunk)
            if self.chunk_delay:
                time.sleep(self.chunk_delay)
        if limit < len(payload):
            handler.close_connection = True
        if fault.cut_after is not None:
            # Give the client time to take the bytes off the wire, then reset: linger 0 makes close() send RST.
            time.sleep(0.05)
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()


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
