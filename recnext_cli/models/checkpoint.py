"""Reading backbone weights out of ImageNet, mmdet or plain checkpoint files without unpickling arbitrary objects."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from recnext_cli.compat.checkpoint import load_from_local
from recnext_cli.errors import IntegrityError, UsageError

BACKBONE_PREFIX = "backbone."


def read_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a checkpoint file, keyed as in the backbone's own state_dict.

    Accepts an ImageNet checkpoint (`{'model': state_dict}`, whose classifier `head.*` keys are kept and later
    reported as unexpected), an mmdet checkpoint (`{'state_dict': …}` with `backbone.`-prefixed keys; the
    detector's other parts are dropped) or a bare state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Backbone checkpoint {path} does not exist; download it with `recnext download` first.")
    try:
        obj = load_from_local(str(path), map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise IntegrityError(
            f"{path} holds Python objects besides tensors and numpy values, which recnext does not unpickle; give the "
            f"backbone an ImageNet checkpoint ({{'model': state_dict}}) or a plain state dict: {str(exc).splitlines()[0]}"
        ) from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary.")
    for container in ("state_dict", "model"):
        if isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    if any(key.startswith(BACKBONE_PREFIX) for key in obj):
        obj = {key[len(BACKBONE_PREFIX) :]: value for key, value in obj.items() if key.startswith(BACKBONE_PREFIX)}
    tensors = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise IntegrityError(f"{path} contains no tensors.")
    return tensors
