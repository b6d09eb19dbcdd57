"""Where recnext keeps files: the user cache directory, or $RECNEXT_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    override = os.environ.get("RECNEXT_HOME")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("recnext", appauthor=False))
