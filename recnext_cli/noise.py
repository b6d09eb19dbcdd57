"""The known, harmless messages of the torch / mmcv stack, silenced before that stack is imported.

- torch's cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=…" on every import on a machine with a CUDA
  toolkit but no GPU (mmcv imports it): recnext never compiles an extension in its commands or workers.
- mmcv 1.7 warns at every import that 2.0 will rename its packages.
- torch's DDP warns (FutureWarning) that `broadcast_buffers`, which mmdet's test and train loops pass, is deprecated;
  what it says about buffers does not apply to them (no rank-local buffers).
- mmdet's COCO evaluation warns at every segm evaluation that it drops the "bbox" key (a v2.12 change of its own).
Everything else still shows.
"""

from __future__ import annotations

import warnings

# (category, start of the message) of the warnings module's known ones.
KNOWN_WARNINGS = (
    (UserWarning, "On January 1, 2023, MMCV will release v2.0.0"),
    (UserWarning, "No CUDA runtime is found"),
    (FutureWarning, "`broadcast_buffers` is deprecated"),
    (UserWarning, 'The key "bbox" is deleted for more accurate mask AP'),
)
KNOWN_LOGGERS = ("torch.utils.cpp_extension",)


def silence() -> None:
    """Filter the known messages in this process; cheap enough for every command (no torch import)."""
    import logging

    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in KNOWN_LOGGERS:
        # Only its warnings about the CUDA toolkit: errors still show.
        logging.getLogger(name).setLevel(logging.ERROR)
