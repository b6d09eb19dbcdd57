"""Makes `import mmcv._ext` find recnext's torchvision-backed ops where mmcv has no compiled extension.

`recnext setup` installs mmcv 1.7.2's Python package without compiling its C++ extension, and writes a one-line
`.pth` file into site-packages that calls `install()` at interpreter start-up, so plain mmdet code finds RoIAlign
and NMS too. The finder sits at the end of `sys.meta_path`: a compiled `_ext` (from `recnext setup --compile-ops`)
is found first and wins. `RECNEXT_MMCV_OPS=torchvision` puts the finder first instead, to use the provider even
beside a compiled build; `RECNEXT_MMCV_OPS=compiled` disables it. This module must stay cheap to import: it runs in
every interpreter of the environment and imports nothing heavy until `mmcv._ext` is actually imported.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

MODULE = "mmcv._ext"
ENV_CHOICE = "RECNEXT_MMCV_OPS"
CHOICES = ("auto", "torchvision", "compiled")
PTH_NAME = "recnext_mmcv_ops.pth"
# The .pth line: loads this one file by path (importing the recnext_cli.compat package would cost every interpreter
# of the environment tens of milliseconds), and does nothing once recnext is uninstalled.
PTH_LINE = (
    "import sys, importlib.util as u; s = u.find_spec('recnext_cli'); "
    "f = s and [d + '/compat/ext_hook.py' for d in s.submodule_search_locations or ()][:1]; "
    "h = f and u.spec_from_file_location('recnext_cli.compat.ext_hook', f[0]); "
    "m = h and sys.modules.setdefault(h.name, u.module_from_spec(h)); "
    "m and (h.loader.exec_module(m), m.install())\n"
)


def choice() -> str:
    value = os.environ.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    return value if value in CHOICES else "auto"


class _ProviderLoader:  # the loader protocol; importlib.abc would cost every interpreter ~25 ms
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        from recnext_cli.compat import mmcv_ext

        for name in ("PROVIDER", "PROVIDED_OPS", "MissingCompiledOp", "get_compiler_version",
                     "get_compiling_cuda_version", *mmcv_ext.PROVIDED_OPS):
            setattr(module, name, getattr(mmcv_ext, name))
        module.__getattr__ = mmcv_ext.__getattr__


class ProviderFinder:  # the meta path finder protocol
    """Answers only for `mmcv._ext`, and only when asked (the finders before it found no compiled extension)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != MODULE:
            return None
        return importlib.machinery.ModuleSpec(MODULE, _ProviderLoader(), origin="recnext (torchvision kernels)")


def _installed() -> ProviderFinder | None:
    return next((finder for finder in sys.meta_path if isinstance(finder, ProviderFinder)), None)


def install() -> None:
    """Register the finder once per interpreter (idempotent), where RECNEXT_MMCV_OPS asks for it."""
    wanted = choice()
    if wanted == "compiled" or _installed() is not None:
        return
    if wanted == "torchvision":
        sys.meta_path.insert(0, ProviderFinder())
    else:
        sys.meta_path.append(ProviderFinder())


def active_provider() -> str | None:
    """'torchvision' when the imported `mmcv._ext` is recnext's, 'compiled' for mmcv-full's own, None if not imported."""
    module = sys.modules.get(MODULE)
    if module is None:
        return None
    return getattr(module, "PROVIDER", None) or "compiled"
