"""Which device and dtype a model runs on: the --device / --dtype values checked against what this machine runs fast."""

from __future__ import annotations

import torch

from recnext_cli.errors import EnvironmentProblem, UsageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_device(device: str) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1") as a torch.device, refusing a GPU that torch cannot see."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu or cuda") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem("--device cuda, but torch sees no GPU here; run with --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"{device} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return resolved


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for "fp32", "fp16" or "bf16", refusing a half type that `device` cannot run at speed."""
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
    if dtype is torch.float32:
        return dtype
    if device.type == "cuda":
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UsageError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16 or fp32")
        return dtype
    if dtype is torch.bfloat16 and not BF16_CPU_FLAGS & cpu_flags():
        # oneDNN runs bf16 on any AVX-512 CPU, but without these instructions it converts in software: slower than fp32.
        raise UsageError("--dtype bf16 needs a CPU with avx512_bf16 or AMX, which this one lacks; use --dtype fp32")
    if not _onednn_runs(dtype):
        # Without oneDNN support the convolutions fall back to scalar reference kernels, and their timings mean nothing.
        alternative = " or bf16" if dtype is torch.float16 and _onednn_runs(torch.bfloat16) else ""
        raise UsageError(
            f"--dtype {name} on this CPU has no fast convolution kernels (oneDNN needs AVX512-FP16 or AVX-NE-CONVERT "
            f"for fp16, avx512_bf16 or AMX for bf16); use --dtype fp32{alternative}"
        )
    return dtype


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the kernel reports for this CPU (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _onednn_runs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    probe = torch.ones(1, 1, 1, 1, dtype=dtype)
    try:
        torch.mkldnn_convolution(probe, probe, None, [0, 0], [1, 1], [1, 1], 1)
    except RuntimeError:
        return False
    return True
