"""What `recnext doctor` reports: the installed stack, the GPUs, the cache, and each known incompatibility."""

from __future__ import annotations

import dataclasses
import platform
import shutil
import sys

from recnext_cli import stack
from recnext_cli.cache import cache_root

OK, FIXED, WARN, BROKEN = "ok", "fixed in-process", "warning", "broken"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    value: str
    status: str
    remedy: str = ""


def _version(module) -> str:
    return getattr(module, "__version__", "?")


def _pinned(name: str, version: str, pinned: str, detail: str = "") -> Check:
    found = f"{version} ({detail})" if detail else version
    if version.split("+")[0] == pinned:
        return Check(name, found, OK)
    return Check(name, found, WARN, f"recnext is tested with {pinned}; `recnext setup` installs it")


def _stack_checks() -> list[Check]:
    checks = [Check("python", f"{platform.python_version()} ({sys.executable})", OK)]
    try:
        import torch
    except ImportError as exc:
        return checks + [Check("torch", f"missing ({exc})", BROKEN, "run `make setup` or `recnext setup`")]
    cuda = torch.version.cuda or "cpu-only build"
    checks.append(_pinned("torch", torch.__version__, stack.TORCH_VERSION, f"CUDA {cuda}"))
    try:
        import torchvision
        checks.append(_pinned("torchvision", _version(torchvision), stack.TORCHVISION_VERSION))
    except Exception as exc:  # torchvision raises RuntimeError, not ImportError, beside a mismatched torch
        checks.append(Check("torchvision", f"broken ({exc})", BROKEN, "run `recnext setup` (mmcv.runner needs it)"))
    try:
        import mmcv
        import mmcv.ops
        from recnext_cli.compat.ops import mmcv_has_cuda_ops

        kernels = "CPU + CUDA" if mmcv_has_cuda_ops() else "CPU only"
        checks.append(_pinned("mmcv-full", mmcv.__version__, stack.MMCV_VERSION, f"compiled ops: {kernels}"))
    except Exception as exc:
        checks.append(Check("mmcv-full", f"missing or broken ({exc})", BROKEN, "run `recnext setup` (builds mmcv-full)"))
    try:
        import mmdet
        checks.append(_pinned("mmdet", _version(mmdet), stack.MMDET_VERSION))
    except Exception as exc:
        checks.append(Check("mmdet", f"missing or broken ({exc})", BROKEN, "run `recnext setup`"))
    import numpy

    checks.append(Check("numpy", numpy.__version__, OK))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    checks.append(Check("GPUs", ", ".join(gpus) if gpus else "none visible (CPU runs only)", OK))
    return checks


def _cache_check() -> Check:
    root = cache_root()
    probe = root if root.exists() else next(p for p in root.parents if p.exists())
    free_gb = shutil.disk_usage(probe).free / 1e9
    status = OK if free_gb > 2 else WARN
    remedy = "" if status == OK else "free some space or point RECNEXT_HOME at a larger disk"
    return Check("cache", f"{root} ({free_gb:.1f} GB free)", status, remedy)


def _fix_checks() -> list[Check]:
    from recnext_cli import compat

    checks = []
    for fix in compat.FIXES:
        try:
            if not fix.needed():
                checks.append(Check(fix.title, "not affected", OK))
                continue
            if not fix.applied():
                fix.apply()
            checks.append(Check(fix.title, fix.symptom, FIXED if fix.applied() else BROKEN, fix.remedy))
        except Exception as exc:
            checks.append(Check(fix.title, f"cannot check: {exc}", BROKEN, "run `recnext setup`"))
    return checks


def diagnose() -> list[Check]:
    checks = _stack_checks()
    checks.append(_cache_check())
    if not any(c.status == BROKEN for c in checks):
        checks += _fix_checks()
    return checks


def usable(checks: list[Check]) -> bool:
    return not any(c.status == BROKEN for c in checks)
