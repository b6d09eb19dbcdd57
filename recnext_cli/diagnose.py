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
        from recnext_cli.compat import ext_hook

        ext_hook.install()
        import mmcv
        import mmcv.ops
        from recnext_cli.compat.ops import compiled_ext, mmcv_has_cuda_ops

        if compiled_ext() is None:
            kernels = "Python package; RoIAlign/NMS from torchvision"
        else:
            kernels = "compiled CPU + CUDA kernels" if mmcv_has_cuda_ops() else "compiled CPU kernels"
        checks.append(_pinned("mmcv", mmcv.__version__, stack.MMCV_VERSION, kernels))
    except Exception as exc:
        checks.append(Check("mmcv", f"missing or broken ({exc})", BROKEN, "run `recnext setup`"))
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


def _ops_checks() -> list[Check]:
    """Which provider computes RoIAlign and NMS, where each runs, and whether they give mmcv's published answers."""
    import torch

    from recnext_cli.compat import ops, ops_check
    from recnext_cli.compat.ext_hook import ENV_CHOICE, choice

    gpu = torch.cuda.is_available()
    if ops.compiled_ext() is None:
        provider = f"torchvision kernels via recnext ({ENV_CHOICE}={choice()})"
        where = "CPU and CUDA tensors: torchvision"
        others = Check("other compiled mmcv ops", "not installed (deformable conv, focal loss, ...): they fail when "
                       "called, naming the op", OK, "`recnext setup --compile-ops` if a model of yours needs them")
    elif ops.mmcv_has_cuda_ops():
        provider, where = "mmcv-full's compiled kernels", "CPU and CUDA tensors: mmcv-full's kernels"
        others = Check("other compiled mmcv ops", "compiled (CPU and CUDA)", OK)
    else:
        provider = "mmcv-full's compiled CPU kernels"
        where = "CPU tensors: mmcv-full's kernels; CUDA tensors: torchvision" + ("" if gpu else " (no GPU here)")
        others = Check("other compiled mmcv ops", "compiled for CPU only", OK)
    checks = [Check("mmcv ops provider", provider, OK)]
    for op, problem in ops_check.published_answers().items():
        if problem is None:
            checks.append(Check(op, f"{where}; matches mmcv's published test values", OK))
        else:
            checks.append(Check(op, f"{where}; {problem}", BROKEN, "run `recnext setup --force-rebuild`"))
    return checks + [others]


def _fix_checks() -> list[Check]:
    from recnext_cli import compat
    from recnext_cli.compat.checks import NotHere

    checks = []
    for fix in compat.FIXES:
        try:
            if not fix.needed():
                checks.append(Check(fix.title, "not affected", OK))
                continue
            if not fix.applied():
                fix.apply()
            problem = fix.check()
        except Exception as exc:
            checks.append(Check(fix.title, f"cannot check: {exc}", BROKEN, "run `recnext setup`"))
            continue
        if isinstance(problem, NotHere):
            checks.append(Check(fix.title, problem, OK))
        elif problem is None:
            checks.append(Check(fix.title, f"{fix.symptom} (the failing call now works)", FIXED, fix.remedy))
        else:
            checks.append(Check(fix.title, f"still fails: {problem}", BROKEN, fix.remedy))
    return checks


def diagnose() -> list[Check]:
    checks = _stack_checks()
    checks.append(_cache_check())
    if not any(c.status == BROKEN for c in checks):
        checks += _ops_checks()
        checks += _fix_checks()
    return checks


def usable(checks: list[Check]) -> bool:
    return not any(c.status == BROKEN for c in checks)
