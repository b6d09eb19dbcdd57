"""What a benchmark result depends on (the machine, its load, library versions) and how its raw record is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a benchmark result depends on: CPU and its ISA flags, threads, load, library versions, date."""
    import os
    import platform
    from datetime import datetime, timezone

    import torch

    from recnext_cli.fastpath import cpu_flags

    isa_prefixes = ("avx", "amx", "fma", "sse4", "f16c", "asimd", "sve")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": sorted(flag for flag in cpu_flags() if flag.startswith(isa_prefixes)),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads or torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor()


def write_result(path: Path, record: dict[str, Any]) -> Path:
    """Write a benchmark's raw record as JSON through a temporary file beside `path`: never a half-written `path`."""
    import json
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(record, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path
