"""Loading mmdet checkpoints under torch >= 2.6, whose torch.load defaults to weights_only=True.

mmcv 1.7.2 calls torch.load without `weights_only`, so on torch >= 2.6 an mmdet checkpoint whose meta holds numpy
values (scores, seeds, dtypes) is refused. The fix keeps the safe unpickler and allows exactly the numpy
reconstruction globals such metadata needs; a file that wants any other Python object is still refused.
"""

from __future__ import annotations

import os

from recnext_cli.compat._util import is_marked, mark, torch_at_least


def fix_needed() -> bool:
    return torch_at_least("2.6")


def numpy_safe_globals() -> list:
    """The numpy objects mmdet 2.x checkpoints carry in `meta` (hook scores, arrays), under numpy 1.x and 2.x names."""
    import numpy

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    # Files pickled by numpy 1.x name numpy.core.multiarray, by numpy 2.x numpy._core.multiarray: allow both spellings.
    named = [
        (function, f"{module}.{function.__name__}")
        for function in (multiarray.scalar, multiarray._reconstruct)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    ]
    # Numeric dtypes only: object arrays would unpickle arbitrary Python objects.
    codes = numpy.typecodes["AllInteger"] + numpy.typecodes["AllFloat"] + "?"
    return [*named, numpy.ndarray, numpy.dtype, *{type(numpy.dtype(code)) for code in codes}]


def load_from_local(filename: str, map_location=None):
    """torch.load with the safe unpickler plus the numpy allow-list; replaces mmcv's loader of the same name.

    mmcv logs "load checkpoint from <name[10:]> path", so the name is kept to keep that line saying "local".
    """
    import torch

    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


def patched() -> bool:
    from mmcv.runner.checkpoint import CheckpointLoader

    return is_marked(CheckpointLoader._schemes.get(""))


def patch() -> None:
    from mmcv.runner.checkpoint import CheckpointLoader

    # The '' scheme (plain paths) is registered at import time, so rebinding the module function would not reach it.
    original = CheckpointLoader._schemes[""]
    CheckpointLoader.register_scheme(prefixes="", force=True)(mark(load_from_local, original))
