"""Small helpers shared by the compat patches: version checks and patch bookkeeping."""

from __future__ import annotations

ORIGINAL = "__recnext_original__"


def torch_at_least(version: str) -> bool:
    import torch
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]) >= Version(version)


def mark(replacement, original):
    """Tag a replacement with what it replaces, so patches are idempotent and tests can restore the original."""
    if replacement is not original:  # patching twice with the same function keeps the first original
        setattr(replacement, ORIGINAL, original)
    return replacement


def is_marked(obj) -> bool:
    return ORIGINAL in getattr(obj, "__dict__", {})


def original_of(obj):
    """The unpatched object behind a replacement, however many times it was patched (the object itself when never)."""
    seen = set()
    while is_marked(obj) and id(obj) not in seen:
        seen.add(id(obj))
        obj = obj.__dict__[ORIGINAL]
    return obj
