"""One safe checkpoint loader for every path mmcv takes: local files, http(s)://, torchvision://, open-mmlab://, mmcls://.

mmcv 1.7.2 loads local files with a bare torch.load (on torch >= 2.6 the safe unpickler, which refuses the numpy
values mmdet keeps in `meta`) and URLs through torch.hub's load_state_dict_from_url, which passes
weights_only=False: a full unpickle, in every worker, of whatever the server sent. Here every scheme ends in
`safe_load`: torch's weights-only unpickler plus exactly the numpy reconstruction globals such metadata needs, so
a file that wants any other Python object is refused before anything in it runs. Schemes with nothing to check
them against (pavi://, s3://, any registered later) are refused outright.
"""

from __future__ import annotations

import functools
import os
import sys
from urllib.error import URLError
from urllib.parse import urlparse

from recnext_cli.compat._util import is_marked, mark, torch_at_least
from recnext_cli.errors import DownloadError, EnvironmentProblem, IntegrityError, RecnextError, UsageError

# torch 2.6 made weights_only the default and fixed the weights-only unpickler's remote code execution
# (CVE-2025-32434, torch <= 2.5.1); nothing older is safe to load an untrusted file with.
MIN_SAFE_TORCH = "2.6"


def fix_needed() -> bool:
    # URLs are fully unpickled on every torch version, not only where local files fail.
    return True


def require_safe_torch() -> None:
    """Refuse to load any checkpoint with a torch whose weights-only unpickler is not safe."""
    import torch

    if not torch_at_least(MIN_SAFE_TORCH):
        raise EnvironmentProblem(
            f"torch {torch.__version__} in {sys.executable} cannot load checkpoints safely (weights-only loading "
            f"needs torch >= {MIN_SAFE_TORCH}); run `recnext setup` to install the pinned torch"
        )


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


def safe_load(source, map_location=None):
    """torch.load of a path or binary file with the weights-only unpickler and the numpy allow-list, nothing more.

    weights_only=True is passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only overrides an unset argument.
    """
    import torch

    require_safe_torch()
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(source, map_location=map_location, weights_only=True)


def load_from_local(filename: str, map_location=None):
    """A local checkpoint through `safe_load`; raises what torch raises (FileNotFoundError when there is no file).

    mmcv logs "load checkpoint from <name[10:]> path", so the loaders keep mmcv's names to keep that line right.
    """
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return safe_load(filename, map_location)


def _downloaded(url: str, model_dir: str | None = None) -> str:
    """The file of `url` in torch.hub's checkpoint cache (where mmcv's loader keeps it), downloaded when absent."""
    import torch.hub

    model_dir = model_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(model_dir, exist_ok=True)
    cached = os.path.join(model_dir, os.path.basename(urlparse(url).path))
    if not os.path.isfile(cached):
        torch.hub.download_url_to_file(url, cached, progress=True)
    return cached


def load_from_http(url: str, map_location=None, model_dir: str | None = None):
    """Download into torch.hub's cache (rank 0 first, as mmcv does, so one job fetches once), then `safe_load`."""
    import torch.distributed as dist
    from mmcv.runner import get_dist_info

    rank, world_size = get_dist_info()
    if rank == 0:
        path = _downloaded(url, model_dir)
    if world_size > 1:
        dist.barrier()
        if rank > 0:
            path = _downloaded(url, model_dir)
    return safe_load(path, map_location)


def load_from_torchvision(filename: str, map_location=None):
    from mmcv.runner import checkpoint as mmcv_checkpoint

    name = filename.split("://", 1)[1].lower().replace("_weights", "")
    urls = mmcv_checkpoint.get_torchvision_models()
    if name not in urls:
        raise UsageError(f"{filename}: torchvision has no weights called {name!r}")
    return load_from_http(urls[name], map_location)


def load_from_openmmlab(filename: str, map_location=None):
    from mmcv.runner import checkpoint as mmcv_checkpoint

    name = filename.split("://", 1)[1]
    name = mmcv_checkpoint.get_deprecated_model_names().get(name, name)
    urls = mmcv_checkpoint.get_external_models()
    if name not in urls:
        raise UsageError(f"{filename}: mmcv's model zoo (and $MMCV_HOME/open_mmlab.json) has no entry {name!r}")
    if urls[name].startswith(("http://", "https://")):
        return load_from_http(urls[name], map_location)
    return load_from_local(os.path.join(mmcv_checkpoint._get_mmcv_home(), urls[name]), map_location)


def load_from_mmcls(filename: str, map_location=None):
    from mmcv.runner import checkpoint as mmcv_checkpoint

    name = filename.split("://", 1)[1]
    urls = mmcv_checkpoint.get_mmcls_models()
    if name not in urls:
        raise UsageError(f"{filename}: mmcv's mmcls zoo has no entry {name!r}")
    return mmcv_checkpoint._process_mmcls_checkpoint(load_from_http(urls[name], map_location))


def load_from_unsupported(filename: str, map_location=None):
    raise UsageError(
        f"{filename}: recnext loads checkpoints from local paths, http(s)://, torchvision://, open-mmlab:// and "
        "mmcls:// only; copy the file to a local path and pass that"
    )


SAFE_LOADERS = {
    "": load_from_local,
    "http://": load_from_http,
    "https://": load_from_http,
    "modelzoo://": load_from_torchvision,
    "torchvision://": load_from_torchvision,
    "open-mmlab://": load_from_openmmlab,
    "openmmlab://": load_from_openmmlab,
    "mmcls://": load_from_mmcls,
}


def load_failure(exc: BaseException) -> str:
    """The reason torch gives for refusing a file, without the pages of generic advice around it."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # a global outside the allow-list
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed"):  # a blocked module (os, subprocess, ...)
        paragraphs = [paragraph for paragraph in text.split("\n\n") if paragraph.strip()]
        # torch's advice comes first and a link to its documentation last; the reason is what lies between.
        text = " ".join(paragraphs[1:-1]) or text
    return " ".join(text.split())[:300] or type(exc).__name__


def _user_facing(loader):
    """`loader` raising RecnextErrors (one line, exit 2) instead of the traceback of whatever torch or urllib raised."""

    @functools.wraps(loader)
    def load(filename, map_location=None):
        try:
            return loader(filename, map_location)
        except RecnextError:
            raise
        except FileNotFoundError as exc:
            raise UsageError(f"checkpoint {filename} does not exist; check the path") from exc
        except URLError as exc:
            raise DownloadError(f"cannot download checkpoint {filename}: {exc.reason}") from exc
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError…: whatever torch refuses is not loadable
            raise IntegrityError(
                f"checkpoint {filename} is not a file recnext loads (tensors and numeric numpy values only): "
                f"{load_failure(exc)}"
            ) from exc

    return load


def patched() -> bool:
    from mmcv.runner.checkpoint import CheckpointLoader

    return all(is_marked(loader) for loader in CheckpointLoader._schemes.values())


def patch() -> None:
    """Put a safe loader behind every prefix mmcv knows, and a refusal behind the ones nothing here can check."""
    from mmcv.runner.checkpoint import CheckpointLoader

    for prefix, original in list(CheckpointLoader._schemes.items()):
        if not is_marked(original):
            replacement = _user_facing(SAFE_LOADERS.get(prefix, load_from_unsupported))
            CheckpointLoader.register_scheme(prefixes=prefix, force=True)(mark(replacement, original))
