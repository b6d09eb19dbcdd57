"""Check a checkpoint's structure without torch: a safe unpickler that builds nothing it names, and layout checks."""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
from pathlib import Path

from recnext_cli import cache, variants, zoo
from recnext_cli.errors import IntegrityError
from recnext_cli.zoo import Checkpoint

MAX_PICKLE_BYTES = 64 << 20  # a checkpoint's data.pkl holds names and shapes, the tensors are separate entries


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
    title = checkpoint.title
    problems = []
    if not all(isinstance(value, _Tensor) for value in backbone.values()):
        problems.append("backbone entries that are not tensors")
    else:
        fingerprint = variants.backbone_fingerprint({key: value.shape for key, value in backbone.items()})
        if fingerprint != checkpoint.variant.fingerprint:
            match = variants.variant_for_fingerprint(fingerprint)
            problems.append(f"it holds a {match.title} backbone" if match else (
                f"its {len(backbone)} backbone tensors do not have {title}'s keys and shapes"
            ))
    absent = [part for part in layout.other_parts if not any(isinstance(key, str) and key.startswith(part) for key in state)]
    if absent:
        problems.append(f"no {', '.join(absent)} weights")
    if problems:
        raise IntegrityError(
            f"{checkpoint.file_name} does not hold a {title} {checkpoint.kind} checkpoint: {'; '.join(problems)}"
        )
